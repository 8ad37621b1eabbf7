"""``python -m qcompile quantize MODEL_DIR OUT_DIR --policy policy.json``: quantise a
transformers checkpoint tensor by tensor (qcompile/integrations/stream.py, docs/saving.md),
printing the layers packed, the sizes and the peak memory.

``python -m qcompile op-library``: print the path of the C++ operator library (built first if
need be), which a C++ process loads before it runs an exported package (examples/cpp/)."""
from __future__ import annotations

import argparse
import ctypes
import sys

import torch

from .policy import Policy, PolicyError
from .serialize import QuantizedFileError

DTYPES = ("float32", "bfloat16", "float16")


def _return_freed_memory():
    """glibc serves large allocations from its heap once its mmap threshold has adapted, and
    keeps freed quantisation temporaries there; a fixed threshold gives them back at once
    (mallopt(M_MMAP_THRESHOLD), the same as MALLOC_MMAP_THRESHOLD_=65536)."""
    try:
        ctypes.CDLL(None).mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: its allocator's own policy applies
        pass


def _resident_mib(field: str = "VmRSS") -> float:
    """The process's resident memory (``VmHWM``: its peak) in MiB, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def _reset_peak() -> bool:
    """Start the kernel's peak-resident count afresh (Linux >= 4.0), so that the peak
    reported is that of quantising, not of importing torch."""
    try:  # (and /proc/self/status must exist to read it back)
        with open("/proc/self/status"), open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _print_op_library() -> int:
    from .codegen.cpu.build import op_library_file
    from .codegen.select import NoKernel
    try:
        print(op_library_file())
    except (NoKernel, RuntimeError) as e:  # no compiler, a failed build
        print(f"python -m qcompile op-library: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qcompile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantise a safetensors checkpoint, tensor by tensor",
                       description="Quantise the transformers checkpoint MODEL_DIR with a "
                       "policy into OUT_DIR, which from_pretrained loads (after import "
                       "qcompile). Memory: about the packed model plus one float tensor.")
    q.add_argument("model_dir", help="a from_pretrained folder with safetensors weights")
    q.add_argument("out_dir", help="a new (or empty) folder for the packed model")
    q.add_argument("--policy", required=True,
                   help="a policy JSON file (qcompile.Policy.to_json, docs/policies.md)")
    q.add_argument("--dtype", choices=DTYPES, default=None,
                   help="the dtype the weights are packed from (default: config.json's)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("op-library", help="print the path of the C++ operator library",
                   description="Print the path of the library that defines the qcompile_cpu "
                   "operators and qc_register_package (built with this torch and the system "
                   "C++ compiler if it is not cached yet): what a C++ process loads before it "
                   "runs a package made by qcompile.export (examples/cpp/README.md).")
    args = parser.parse_args(argv)
    if args.command == "op-library":
        return _print_op_library()

    from .integrations.stream import prepare
    try:
        with open(args.policy) as f:
            policy = Policy.from_json(f.read())
    except OSError as e:
        parser.error(f"--policy: cannot read {args.policy}: {e.strerror}")
    except PolicyError as e:
        parser.error(f"--policy {args.policy}: {e}")
    _return_freed_memory()
    try:
        job = prepare(args.model_dir, args.out_dir, policy,
                      dtype=getattr(torch, args.dtype) if args.dtype else None)
        start = _resident_mib() if _reset_peak() else None  # libraries and the meta model
        result = job.run(progress=not args.quiet)
    except (QuantizedFileError, PolicyError, FileNotFoundError) as e:
        print(f"python -m qcompile quantize: {e}", file=sys.stderr)
        return 2
    print(result)
    if start is not None:  # (not getrusage: its peak includes the parent's, copied at fork)
        print(f"resident memory: {start:.1f} MiB before quantising, peak "
              f"{_resident_mib('VmHWM'):.1f} MiB while quantising")
    print(f"load it with AutoModelForCausalLM.from_pretrained({args.out_dir!r}) after "
          "import qcompile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
