"""qcompile.export / qcompile.load_package: a quantised model compiled ahead of time by
AOTInductor into one .pt2 package, loaded in a fresh process without torch.compile.

One package (a small MLP whose layers run both C++ operators: the integer path and a weight-only
format, with a dynamic batch) is compiled once for the module; the tests read, copy and damage
it. The oracle is ``qcompile.compile`` of another copy of the float model with the same policy
and the eager lowering: the same C++ operator on weights it packs itself, so the package must
agree bit for bit (ReLU is exact in any order). The tiny Llama with a dynamic sequence length
compiles for minutes on 2 cores: marked slow."""
import copy
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import qcompile
from qcompile import LayerSpec, Policy, aot

ROOT = Path(__file__).resolve().parents[1]
POLICY = Policy({"0": LayerSpec(weight="int4", act="mxint8")},  # int x int: int_linear
                default=LayerSpec(weight="nf4"))                 # weight-only: linear


def float_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 96)).eval()


def inputs():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(m, 64, generator=g) for m in (1, 5, 40)]  # the GEMV and the GEMM


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A model quantize_model_ packed, exported with policy None (taken as it is)."""
    model = qcompile.quantize_model_(float_mlp(), POLICY)
    path = tmp_path_factory.mktemp("pkg") / "mlp.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    assert qcompile.export(model, None, (torch.randn(3, 64),), path,
                           dynamic_shapes=({0: batch},)) == str(path)
    return path


@pytest.fixture(scope="module")
def loaded(package):
    return qcompile.load_package(package)


@pytest.fixture(scope="module")
def compiled_mlp():
    model = qcompile.compile(float_mlp(), POLICY, lowering="eager")
    with torch.no_grad():
        return [model(x) for x in inputs()]


def test_the_package_equals_the_compiled_model_bit_for_bit(loaded, compiled_mlp):
    plain = float_mlp()
    for x, want in zip(inputs(), compiled_mlp):
        got = loaded(x)
        assert got.shape == want.shape and torch.equal(got, want)
        with torch.no_grad():
            assert not torch.equal(got, plain(x))  # quantised, not the float model


def test_the_record_names_each_format_the_graph_calls(loaded):
    rec = loaded.record
    assert sorted(e["format"] for e in rec["formats"].values()) == ["int4", "nf4"]
    assert [e["format"] for e in rec["acts"].values()] == ["mxint8"]
    assert rec["qcompile"] == qcompile.__version__ and rec["torch"] == torch.__version__


def test_the_package_holds_packed_weights_and_no_float_copy(package):
    """The float weights of the quantised layers appear nowhere in the archive's bytes; their
    packed codes do (so the search can find a constant)."""
    data = package.read_bytes()
    plain, packed = float_mlp(), qcompile.quantize_model_(float_mlp(), POLICY)
    for i in (0, 2):
        row = plain[i].weight.detach()[0, :16].numpy().tobytes()
        assert len(row) == 64 and row not in data
        assert packed[i].codes[0].numpy().tobytes() in data
    assert plain[0].bias.detach().numpy().tobytes() in data  # the biases stay float


CHILD = """
import sys, torch, qcompile
run = qcompile.load_package(sys.argv[1])
xs = torch.load(sys.argv[2])
torch.save([run(x) for x in xs], sys.argv[3])
from torch._dynamo.utils import counters
print("FRAMES", sum(counters["frames"].values()))
"""


def run_child(script, *args, env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_fresh_process_gets_the_same_results_without_dynamo(package, compiled_mlp, tmp_path):
    torch.save(inputs(), tmp_path / "x.pt")
    done = run_child(CHILD, package, tmp_path / "x.pt", tmp_path / "y.pt")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FRAMES 0" in done.stdout
    for got, want in zip(torch.load(tmp_path / "y.pt"), compiled_mlp):
        assert torch.equal(got, want)


def test_a_process_without_the_operator_library_is_refused(package, tmp_path):
    """No cached library and no compiler to build one: refused before AOTInductor loads."""
    script = "import sys, qcompile\nqcompile.load_package(sys.argv[1])\n"
    done = run_child(script, package, env={"QCOMPILE_KERNEL_CACHE": str(tmp_path / "empty"),
                                           "CXX": str(tmp_path / "no-compiler")})
    assert done.returncode != 0
    assert "PackageError" in done.stderr and "qcompile_cpu operators" in done.stderr
    assert "no-compiler" in done.stderr


def entry_offset(path, suffix: str) -> tuple[int, int]:
    """(offset of the first data byte, size) of the archive entry whose name ends in suffix."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    name_len, extra_len = int.from_bytes(head[26:28], "little"), int.from_bytes(head[28:30],
                                                                                "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


@pytest.mark.parametrize("suffix", [".so", ".wrapper.json", "qcompile.json"])
def test_a_changed_byte_is_refused(package, tmp_path, suffix):
    bad = tmp_path / "bad.pt2"
    data = bytearray(package.read_bytes())
    start, size = entry_offset(package, suffix)
    data[start + size // 2] ^= 0x20
    bad.write_bytes(bytes(data))
    with pytest.raises(aot.PackageError, match="damaged|not JSON"):
        qcompile.load_package(bad)


def test_a_truncated_file_is_refused(package, tmp_path):
    bad = tmp_path / "short.pt2"
    bad.write_bytes(package.read_bytes()[:-100])
    with pytest.raises(aot.PackageError, match="damaged or not a .pt2 archive"):
        qcompile.load_package(bad)


def rewritten(package, tmp_path, change) -> Path:
    """A copy of the package whose record ``change`` edits, digested again (as a package
    exported by another qcompile would be)."""
    from torch.export.pt2_archive import PT2ArchiveReader
    with PT2ArchiveReader(str(package)) as r:
        record = json.loads(r.read_string(aot.RECORD_PATH))
    change(record)
    out = tmp_path / "rewritten.pt2"
    aot._copy_with_record(str(package), str(out), record)
    return out


def _first(section):
    return lambda rec: next(iter(rec[section].values()))


@pytest.mark.parametrize("change, message", [
    (lambda r: _first("formats")(r).update(tables="0" * 64), "does not match this qcompile's"),
    (lambda r: _first("formats")(r).update(format="int3"), "does not match this qcompile's"),
    (lambda r: _first("acts")(r).update(tables="0" * 64), "activation format 'mxint8'"),
    (lambda r: _first("formats")(r).update(format="nosuch4"), "does not know"),
    (lambda r: r.update(qcompile="0.0.1"), "exported by qcompile 0.0.1"),
    (lambda r: r.update(package_format=99), "package format 99"),
    (lambda r: r["operators"].update(linear="qcompile_cpu::linear(Tensor x) -> Tensor"),
     "calls operators"),
])
def test_a_record_that_does_not_match_this_qcompile_is_refused(package, tmp_path, change,
                                                               message):
    with pytest.raises(aot.PackageError, match=message):
        qcompile.load_package(rewritten(package, tmp_path, change))


def test_a_package_for_another_instruction_set_is_refused(package, tmp_path):
    other = next(i for i in ("avx512_vnni", "scalar") if i != qcompile.codegen.cpu.chosen_isa())
    bad = rewritten(package, tmp_path, lambda r: _first("formats")(r).update(isa=other))
    with pytest.raises(aot.PackageError, match=f"QCOMPILE_CPU_ISA={other}"):
        qcompile.load_package(bad)


def test_what_a_package_cannot_run_yet_is_refused_before_compiling(tmp_path):
    x = (torch.randn(2, 64),)
    with pytest.raises(ValueError, match="must end in .pt2"):
        qcompile.export(float_mlp(), POLICY, x, tmp_path / "m.zip")
    act_only = Policy({"0": LayerSpec(act="mxint8")}, default=None)
    with pytest.raises(NotImplementedError, match="only the activations of \\['0'\\]"):
        qcompile.export(float_mlp(), act_only, x, tmp_path / "m.pt2")
    table = Policy({"0": LayerSpec(weight="nf4", op="embedding")}, default=None)
    with pytest.raises(NotImplementedError, match="op='embedding'"):
        qcompile.export(float_mlp(), table, x, tmp_path / "m.pt2")
    codebook = Policy({}, default=LayerSpec(weight="quantile4"))  # tables from side data
    with pytest.raises(NotImplementedError, match="Python ops.*quantile4"):
        qcompile.export(float_mlp(), codebook, x, tmp_path / "m.pt2")
    assert not (tmp_path / "m.pt2").exists()


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


@pytest.mark.slow
def test_a_tiny_llama_with_a_dynamic_sequence_length(tmp_path):
    """Weight-only: within the documented Inductor bound (rtol = atol = 1e-4 on the logits,
    docs/architecture.md) of the compiled model with the eager lowering."""
    import archs
    policy = Policy({"model.lm_head": LayerSpec(weight="int8"),  # under the Logits wrapper
                     "*.mlp.*": LayerSpec(weight="int4")}, default=LayerSpec(weight="nf4"))
    seq = torch.export.Dim("seq", min=2, max=32)
    path = qcompile.export(Logits(archs.small_llama()), policy, (torch.randint(0, 128, (1, 7)),),
                           tmp_path / "llama.pt2", dynamic_shapes={"ids": {1: seq}})
    run = qcompile.load_package(path)
    assert sorted(e["format"] for e in run.record["formats"].values()) == ["int4", "int8", "nf4"]
    want = qcompile.compile(Logits(archs.small_llama()), copy.deepcopy(policy), lowering="eager")
    plain = Logits(archs.small_llama())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n in (3, 7, 20):
            ids = torch.randint(0, 128, (1, n), generator=g)
            got, ref = run(ids), want(ids)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
            assert (got - plain(ids)).abs().max() > 1e-3  # quantised


@pytest.mark.slow
def test_the_docs_example_runs_as_written(tmp_path):
    """docs/export.md's two blocks, each in a fresh interpreter, as a newcomer pastes them: the
    second loads what the first wrote, with every format the policy names."""
    import re
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs/export.md").read_text(), re.S)
    assert len(blocks) == 3 and "qcompile.export(" in blocks[0]  # (the third: decoding)
    for block in blocks[:2]:
        done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    assert "formats=['bof4s_opq', 'int8', 'mxint8', 'nf4']" in done.stdout
    assert "torch.Size([1, 5, 128])" in done.stdout
