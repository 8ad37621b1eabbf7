"""python -m benchmarks <command> [options]; each command's --help lists its options.

weights  weight error of every format on all-MiniLM-L6-v2 (CPU)
run      the main benchmark: perplexity, embeddings, speed and memory (`make main`)
policy   SmolLM2-135M compiled with a mixed policy: explain totals, compile time, memory
kernels  the fused Triton kernels against cuBLAS on Llama-7B shapes (GPU; --smoke on CPU)
search   per-layer policies searched under bit budgets beside the uniform formats (SmolLM2)
loading  peak memory of quantising SmolLM2-135M while loading, by command, and of loading it
framework  per decode step of compiled SmolLM2-135M: wall time, operators, and the rest
ab       decode speed of two checkouts side by side, their workers taking turns
distributed  SmolLM2-135M nf4 on 1 and 2 tensor-parallel ranks (torchrun, gloo): memory, logits
"""
import argparse
import importlib
import sys

MODULES = {"weights": "weights", "run": "run", "policy": "policy_report", "kernels": "kernels",
           "search": "search", "loading": "loading", "framework": "framework",
           "ab": "ab", "distributed": "distributed_cli"}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__,
        usage=f"%(prog)s {{{','.join(MODULES)}}} [options]",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=list(MODULES), metavar="command",
                    help=f"the benchmark to run, one of {', '.join(MODULES)} (listed above)")
    ap.add_argument("options", nargs=argparse.REMAINDER,
                    help="the command's own options: python -m benchmarks COMMAND --help")
    return ap


def main(argv):
    """Dispatch to a command's main() with the rest of argv; -h/--help prints the commands
    (exit 0); a missing or unknown command is a usage error (exit 2), as argparse does."""
    ap = parser()
    if argv and argv[0] in ("-h", "--help"):
        ap.print_help()
        ap.exit(0)
    commands = ", ".join(MODULES)
    if not argv:
        ap.error(f"no command given; choose one of {commands}")
    if argv[0] not in MODULES:
        ap.error(f"unknown command {argv[0]!r}; choose one of {commands}")
    importlib.import_module(f"benchmarks.{MODULES[argv[0]]}").main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
