"""``python -m benchmarks kernels --static DIR``: what the generated GPU linear kernels compile
to for sm_90 (H100/H200), without a GPU.

Every kernel of the list below is compiled, for each of its autotune configs, with the
installed Triton for sm_90 (Triton's own compiler and the ptxas it ships), specialised as a
real launch: pointers and the sizes N, K, row_bytes, stride_xm, n_blocks divisible by 16 (as
for a Llama-7B layer; M = N = K = 4096 for the kernels' heuristics), the GEMV at M = 1 (the
only M it serves). The W8A8 kernels read the int8 codes their prologue kernel wrote. For each,
DIR gets the PTX file and one JSON line in DIR/kernels.jsonl: kernel kind, weight and
activation format, variant, config, registers, spilled bytes, shared memory bytes, and counts
read from the PTX
(128-bit vector loads of global memory, byte loads, float divisions, integer divisions). The
table printed at the end checks issue 11's static targets per kernel: every config within
227 KB of shared memory (an H100's per-block limit) and without spills, 128-bit loads, no
byte load or division per element (at most PER_BLOCK such instructions: per block).
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

# (weight format, activation format, variant)
STATIC_KERNELS = [(w, None, v) for w in ("nf4", "int4", "mxfp4", "mxint8")
                  for v in ("gemv", "gemm")] + [("mxint8", "mxint8", "gemm"),
                                                ("mxint8", "mxint8", "gemv")]
SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on an H100 / H200
# A load or division made per element appears once per element a thread decodes (16 to 64 in
# these tiles); one made per block (an E8M0 scale byte, an absmax division) once or twice.
PER_BLOCK = 2
MIN_M1_PROGRAMS = 4 * 132  # M = 1, 4096 x 4096: several programs per SM of an H100
# sizes a real 4096-wide layer divides by 16 (n_blocks: 4096 / 32 = 128 blocks per row)
DIVISIBLE = ("N", "K", "row_bytes", "stride_xm", "n_blocks")
PTX_COUNTS = {"vector_loads_128": r"ld\.global(?:\.[\w:]+)*\.v4\.|cp\.async\.c[ag]\.shared"
                                  r"\.global(?:\.[\w:]+)* \[[^\]]+\], \[[^\]]+\], (?:16|0x10)\b",
              "byte_loads": r"ld\.global(?:\.[\w:]+)*\.[bu]8\b",
              "float_divisions": r"div\.(?:rn|full|approx)\.f32",
              "int_divisions": r"(?:div|rem)\.[su](?:32|64)"}


def _ptxas() -> Path:
    import triton
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def _resources(ptx_file: Path) -> dict:
    """Registers, spills and stack from ptxas -v (the cubin Triton makes from the same PTX)."""
    done = subprocess.run([str(_ptxas()), "-v", "--gpu-name", "sm_90a", str(ptx_file), "-o",
                           str(ptx_file.with_suffix(".cubin"))], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed on {ptx_file}: {done.stderr[-2000:]}")
    text = done.stderr + done.stdout
    number = lambda pattern: int(re.search(pattern, text).group(1))
    return {"registers": number(r"Used (\d+) registers"),
            "spill_bytes": number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
            "stack_bytes": number(r"(\d+) bytes stack frame")}


def _signature(fn, fmt, dtype_name: str) -> tuple[dict, dict]:
    """Triton's signature of the kernel and its divisibility attributes, as a launch gives."""
    import torch

    from qcompile.codegen.triton import emit

    d = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype_name]
    ptrs = {"x_ptr": "*" + d, "xq_ptr": "*i8", "ax_ptr": "*fp32", "codes_ptr": "*u8",
            "bias_ptr": "*" + d, "out_ptr": "*" + d, "ws_ptr": "*fp32",
            "scales_ptr": {torch.float32: "*fp32", torch.uint8: "*u8"}[fmt.scale.stored_dtype],
            **{name: "*fp32" for name in emit.decode_operands(fmt)}}  # float32 tables
    sig = {n: ptrs.get(n, "constexpr" if n.isupper() and len(n) > 1 else "i32")
           for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n in ptrs or n in DIVISIBLE}
    return sig, attrs


def compile_all(out: Path, dtype_name: str = "float16", kernels=STATIC_KERNELS,
                configs: int | None = None) -> list[dict]:
    """Compile ``kernels`` (the first ``configs`` autotune configs of each; None: all)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qcompile import formats
    from qcompile.codegen.cache import load_kernel
    from qcompile.codegen.triton.linear import linear_source

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for wf, af, variant in kernels:
        fmt = formats.get(wf)
        src = linear_source(fmt, af, variant=variant, dtype=getattr(torch, dtype_name),
                            interpret=False)
        tuner = load_kernel(src, "linear_kernel")
        fn, heuristics = tuner.fn, {}
        while not isinstance(fn, triton.runtime.JITFunction):  # under autotune, heuristics
            heuristics.update(getattr(fn, "values", {}))
            fn = fn.fn
        sig, attrs = _signature(fn, fmt, dtype_name)
        launches = [(1, {"M": 1, "BLOCK_M": 1})] if variant == "gemv" else [(None, {})]
        for i, cfg in enumerate(tuner.configs[:configs]):
            for m, special in launches:
                consts = {"HAS_BIAS": False, "QBLOCK": fmt.block_size, **cfg.kwargs,
                          **special}
                # the kernel's heuristics (EVEN_K, ...) as a Llama-7B launch computes them
                consts.update({name: rule({"M": 4096, "N": 4096, "K": 4096, **consts})
                               for name, rule in heuristics.items()})
                name = f"{wf}_{af or 'none'}_{variant}_{dtype_name}_c{i}" + (f"_m{m}" if m else "")
                k = triton.compile(ASTSource(fn, {**sig, **({"M": "constexpr"} if "M" in
                                                                   special else {})},
                                             consts, attrs),
                                   target=GPUTarget("cuda", 90, 32),
                                   options={"num_warps": cfg.num_warps,
                                            "num_stages": cfg.num_stages,
                                            "enable_fp_fusion": False})
                ptx_file = out / f"{name}.ptx"
                ptx_file.write_text(k.asm["ptx"])
                row = {"kernel": "linear", "weight": wf, "act": af, "variant": variant,
                       "dtype": dtype_name, "M": m,
                       "config": {**cfg.kwargs, "BLOCK_M": consts.get("BLOCK_M"),
                                  "SPLIT_K": consts.get("SPLIT_K", 1),
                                  "num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
                       "shared_bytes": k.metadata.shared, **_resources(ptx_file),
                       **{key: len(re.findall(p, k.asm["ptx"])) for key, p in PTX_COUNTS.items()},
                       "ptx": ptx_file.name, "triton": triton.__version__}
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(out / "kernels.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def m1_programs(row: dict, n: int = 4096) -> int:
    """Programs the GEMV launches at M = 1 for N = K = 4096: one per BLOCK_N outputs and K
    split."""
    return -(-n // row["config"]["BLOCK_N"]) * row["config"].get("SPLIT_K", 1)


def summary(rows: list[dict]) -> str:
    """One line per kernel: the worst config against each static target."""
    groups = {}
    for r in rows:
        groups.setdefault((r["weight"], r["act"] or "-", r["variant"]), []).append(r)
    head = ["weight", "act", "variant", "configs", "max regs", "max spill B", "max smem KB",
            "128-bit loads", "byte loads", "fp32 divs", "int divs", "M=1 grid", "targets"]
    body = []
    for (w, a, v), rs in groups.items():
        grid = min(m1_programs(r) for r in rs) if v == "gemv" else None
        ok = all(r["shared_bytes"] <= SMEM_LIMIT and r["spill_bytes"] == 0
                 and r["vector_loads_128"] > 0 and r["byte_loads"] <= PER_BLOCK
                 and r["float_divisions"] <= PER_BLOCK and r["int_divisions"] <= PER_BLOCK
                 for r in rs) and (grid is None or grid >= MIN_M1_PROGRAMS)
        body.append([w, a, v, len(rs), max(r["registers"] for r in rs),
                     max(r["spill_bytes"] for r in rs),
                     f"{max(r['shared_bytes'] for r in rs) / 1024:.0f}",
                     min(r["vector_loads_128"] for r in rs), max(r["byte_loads"] for r in rs),
                     max(r["float_divisions"] for r in rs), max(r["int_divisions"] for r in rs),
                     "-" if grid is None else grid, "met" if ok else "missed"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, b)) + " |" for b in body]
    return "\n".join(lines)


def main(out: Path) -> str:
    rows = compile_all(out)
    text = (f"Static sm_90 analysis of {len(rows)} compiled kernels (see {out}/kernels.jsonl). "
            "Targets, in every config: smem <= 227 KB, no spills, 128-bit loads, byte loads "
            "and divisions per block only (at most 2 instructions each), and for the GEMV "
            "at least 4 x 132 programs at M = 1 on 4096 x 4096.\n\n"
            + summary(rows) + "\n")
    (out / "summary.md").write_text(text)
    print(text)
    return text
