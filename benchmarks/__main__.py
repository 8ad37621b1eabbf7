"""python -m benchmarks <command> [options]; each command's --help lists its options.

weights  weight error of every format on all-MiniLM-L6-v2 (CPU)
run      the main benchmark: perplexity, embeddings, speed and memory (`make main`)
policy   SmolLM2-135M compiled with a mixed policy: explain totals, compile time, memory
kernels  the fused Triton kernels against cuBLAS on Llama-7B shapes (GPU; --smoke on CPU)
"""
import importlib
import sys

MODULES = {"weights": "weights", "run": "run", "policy": "policy_report", "kernels": "kernels"}


def main(argv):
    if not argv or argv[0] not in MODULES:
        sys.exit(f"usage: python -m benchmarks {{{','.join(MODULES)}}} [options]\n\n{__doc__}")
    importlib.import_module(f"benchmarks.{MODULES[argv[0]]}").main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
