"""python -m benchmarks <command>: `weights` (weight error of every format on MiniLM)."""
import sys

from . import weights

COMMANDS = {"weights": weights.main}
COMMANDS["kernels"] = lambda argv: __import__("benchmarks.kernels", fromlist=["main"]).main(argv)
COMMANDS["run"] = lambda argv: __import__("benchmarks.run", fromlist=["main"]).main(argv)

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m benchmarks {{{','.join(COMMANDS)}}} [options]")
    COMMANDS[sys.argv[1]](sys.argv[2:])
