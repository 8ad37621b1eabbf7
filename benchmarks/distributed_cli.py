"""``python -m benchmarks distributed [options]``: the run command's distributed section alone
(benchmarks/distributed.py), here rather than there so that the section does not import the run
command that runs it."""
import sys

from . import run


def main(argv=None):
    """``python -m benchmarks distributed [options]``: the run command's distributed section
    alone, with the run command's options."""
    argv = list(sys.argv[2:] if argv is None else argv)
    if any(a == "--sections" or a.startswith("--sections=") for a in argv):
        run.parser().error("python -m benchmarks distributed runs the distributed section only; "
                           "drop --sections (or use python -m benchmarks run --sections ...)")
    return run.main(["--sections", "distributed", *argv])
