"""benchmarks/kernel_static.py (`python -m benchmarks kernels --static DIR`): its PTX counts on
hand-written instructions, its judgement on hand-built rows, and one real sm_90 compile (no GPU
needed) whose files and numbers are checked."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import kernel_static as ks

ROOT = Path(__file__).resolve().parents[1]


def count(ptx: str) -> dict:
    return {k: len(re.findall(p, ptx)) for k, p in ks.PTX_COUNTS.items()}


def test_ptx_counts_on_known_instructions():
    ptx = "\n".join([
        "ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];",
        "@%p1 ld.global.L1::evict_last.v4.u32 { %r5, %r6, %r7, %r8 }, [ %rd2 + 0 ];",
        "cp.async.cg.shared.global [ %r9 + 0 ], [ %rd3 + 0 ], 0x10, %r24;",
        "cp.async.ca.shared.global [ %r9 + 0 ], [ %rd3 + 0 ], 4;",  # 4 bytes: not 128-bit
        "ld.global.b8 { %rs1 }, [ %rd4 + 0 ];", "ld.global.L1::evict_last.b8 %rs9, [%rd1];",
        "@%p2 ld.global.u8 %rs2, [%rd5];",
        "ld.global.b16 %rs3, [%rd6];",
        "div.rn.f32 %f1, %f2, %f3;",
        "div.s32 %r10, %r11, %r12;", "rem.u64 %rd7, %rd8, %rd9;",
        "mul.f32 %f4, %f5, %f6;"])
    assert count(ptx) == {"vector_loads_128": 3, "byte_loads": 3, "float_divisions": 1,
                          "int_divisions": 2}


def row(**kw):
    base = {"weight": "nf4", "act": None, "variant": "gemm", "registers": 64, "spill_bytes": 0,
            "shared_bytes": 1024, "vector_loads_128": 4, "byte_loads": 0, "float_divisions": 0,
            "int_divisions": 0, "config": {"BLOCK_N": 64}}
    return {**base, **kw}


def test_summary_judges_the_worst_config():
    ok = ks.summary([row(), row(registers=128)])
    assert "| nf4 | - | gemm | 2 | 128 |" in ok and ok.rstrip().endswith("- | met |")
    # the GEMV's M = 1 grid on N = 4096: 4096 / BLOCK_N programs, at least 4 x 132 wanted
    assert ks.summary([row(variant="gemv", config={"BLOCK_N": 8})]).rstrip().endswith(
        "| 512 | missed |")
    assert ks.summary([row(variant="gemv", config={"BLOCK_N": 4})]).rstrip().endswith(
        "| 1024 | met |")
    assert ks.summary([row(variant="gemv", config={"BLOCK_N": 128, "SPLIT_K": 17})]).rstrip(
        ).endswith("| 544 | met |")  # 32 programs along N, 17 along K
    per_block = ks.summary([row(byte_loads=1, float_divisions=2)])  # an E8M0 byte, a division
    assert per_block.rstrip().endswith("met |")
    for bad in (row(spill_bytes=8), row(shared_bytes=ks.SMEM_LIMIT + 1), row(byte_loads=16),
                row(vector_loads_128=0), row(float_divisions=32), row(int_divisions=16)):
        assert ks.summary([row(), bad]).rstrip().endswith("missed |"), bad


def compile_in_subprocess(tmp_path, kernels, configs=None) -> list[dict]:
    """kernel_static.compile_all in a fresh process without TRITON_INTERPRET (a real compile
    for sm_90); its JSON rows."""
    script = ("import sys; from pathlib import Path; from benchmarks import kernel_static as ks\n"
              f"ks.compile_all(Path(sys.argv[1]), kernels={kernels!r}, configs={configs!r})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["QCOMPILE_KERNEL_CACHE"] = str(tmp_path / "cache")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (tmp_path / "kernels.jsonl").read_text().splitlines()]


def test_one_kernel_compiles_for_sm90(tmp_path):
    rows = compile_in_subprocess(tmp_path, [("mxfp4", None, "gemv")], configs=1)
    assert [r["M"] for r in rows] == [1]  # the GEMV is specialised for M = 1
    for r in rows:
        ptx = (tmp_path / r["ptx"]).read_text()
        assert ".target sm_90" in ptx and ".entry linear_kernel" in ptx
        assert (tmp_path / r["ptx"]).with_suffix(".cubin").stat().st_size > 0
        assert 0 < r["registers"] <= 255 and r["spill_bytes"] >= 0
        assert count(ptx) == {k: r[k] for k in ks.PTX_COUNTS}


@pytest.mark.slow
def test_every_kernel_meets_the_static_targets(tmp_path):
    """Issue 11's static targets, read from the compiled files: every weight-only GEMV and GEMM
    of nf4, int4, mxfp4 and mxint8 and the W8A8 (mxint8 x mxint8) integer GEMV and GEMM, in
    every autotune config (about 2 min). The integer GEMM's dots are int8 tensor-core dots."""
    rows = compile_in_subprocess(tmp_path, ks.STATIC_KERNELS)
    for r in rows:  # the counts come from the files themselves
        ptx = (tmp_path / r["ptx"]).read_text()
        assert count(ptx) == {k: r[k] for k in ks.PTX_COUNTS}
        if r["act"] == "mxint8" and r["variant"] == "gemm":
            assert re.search(r"(wgmma\.mma_async|mma\.sync)\S*\.s32\.s8\.s8", ptx), r["ptx"]
    table = ks.summary(rows).splitlines()[2:]
    assert len(table) == len(ks.STATIC_KERNELS) == 10
    assert all(line.endswith("| met |") for line in table), "\n".join(table)
