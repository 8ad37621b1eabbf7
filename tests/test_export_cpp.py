"""A package made by qcompile.export run with no Python registration: the operator library's C
entry ``qc_register_package`` registers the package's formats from the package alone (the
kernel library and the manifest it carries, codegen/cpu/package.py), and examples/cpp/ runs it
with AOTInductor's C++ loader.

The oracle is ``qcompile.compile`` of the float model with the same policy and the eager
lowering (formats registered by Python from their keys, the process's own kernel library): the
package must agree bit for bit. The C entry is called through ctypes, in a fresh process that
never imports qcompile, and in this one for the packages it must refuse (refused before anything
is registered, or, for tables that differ, after the real ones were). The C++ example itself is
built with cmake (minutes on 2 cores: marked slow; skipped where cmake is not installed)."""
import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qcompile
from qcompile.codegen import cpu
from qcompile.codegen.cpu import package as native

from test_export import POLICY, float_mlp, inputs  # the same MLP and policy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    model = qcompile.quantize_model_(float_mlp(), POLICY)
    path = tmp_path_factory.mktemp("pkg") / "mlp.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    qcompile.export(model, None, (torch.randn(3, 64),), path, dynamic_shapes=({0: batch},))
    return path


@pytest.fixture(scope="module")
def compiled_mlp():
    model = qcompile.compile(float_mlp(), POLICY, lowering="eager")
    with torch.no_grad():
        return [model(x) for x in inputs()]


@pytest.fixture(scope="module")
def op_library():
    """The operator library's path, as the example's README finds it."""
    done = subprocess.run([sys.executable, "-m", "qcompile", "op-library"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    path = done.stdout.strip()
    assert os.path.isfile(path) and path.endswith(".so")
    return path


def test_op_library_without_a_compiler_says_so(tmp_path):
    """No cached library and no compiler to build one: the command fails naming the compiler."""
    env = {**os.environ, "QCOMPILE_KERNEL_CACHE": str(tmp_path / "empty"),
           "CXX": str(tmp_path / "no-compiler")}
    done = subprocess.run([sys.executable, "-m", "qcompile", "op-library"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert "python -m qcompile op-library:" in done.stderr and "no-compiler" in done.stderr


CHILD = """
import ctypes, sys, torch
lib = ctypes.CDLL(sys.argv[1])
lib.qc_register_package.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int64]
lib.qc_register_package.restype = ctypes.c_int64
error = ctypes.create_string_buffer(4096)
print("REGISTERED", lib.qc_register_package(sys.argv[2].encode(), error, 4096), error.value)
from torch._inductor import aoti_load_package
run = aoti_load_package(sys.argv[2])
with torch.no_grad():
    torch.save([run(x) for x in torch.load(sys.argv[3])], sys.argv[4])
print("QCOMPILE IMPORTED", "qcompile" in sys.modules)
"""


def test_a_process_without_qcompile_registers_from_the_package_alone(package, op_library,
                                                                     compiled_mlp, tmp_path):
    torch.save(inputs(), tmp_path / "x.pt")
    done = subprocess.run([sys.executable, "-c", CHILD, op_library, str(package),
                           str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "REGISTERED 3 b''" in done.stdout  # nf4, int4 and the mxint8 activations
    assert "QCOMPILE IMPORTED False" in done.stdout
    for got, want in zip(torch.load(tmp_path / "y.pt"), compiled_mlp):
        assert torch.equal(got, want)


def register(path) -> tuple[int, str]:
    """qc_register_package in this process: (its result, its message)."""
    error = bytes(4096)
    n = cpu.op_library().qc_register_package(str(path).encode(), error, len(error))
    return n, error.split(b"\0")[0].decode()


def rewritten(package, out, change) -> Path:
    """A copy of the package whose files ({name: bytes}) ``change`` edits in place."""
    from torch.export.pt2_archive import PT2ArchiveReader, PT2ArchiveWriter
    with PT2ArchiveReader(str(package)) as r:
        files = {n: r.read_bytes(n) for n in r.get_file_names() if not n.startswith(".data/")}
    change(files)
    with PT2ArchiveWriter(str(out)) as w:
        for name, data in files.items():
            w.write_bytes(name, data)
    return out


def library_entry() -> str:
    return native.kernel_entry(cpu.chosen_isa())


def flip_a_library_byte(files):
    data = bytearray(base64.b64decode(files[library_entry()]))
    data[len(data) // 2] ^= 0x20
    files[library_entry()] = base64.b64encode(bytes(data))


def edit_manifest(edit, reseal: bool):
    """A change that edits the manifest's lines before its sha256 line; ``reseal``: its
    SHA-256 written again (as another exporter's manifest would be), else left as it was."""
    def change(files):
        text = files[native.MANIFEST].decode()
        body, seal = text[:text.rindex("sha256 ")], text[text.rindex("sha256 "):]
        body = edit(body)
        seal = f"sha256 {hashlib.sha256(body.encode()).hexdigest()}\n" if reseal else seal
        files[native.MANIFEST] = (body + seal).encode()
    return change


def first_table_value(value: str):
    """The first format's first table value replaced with ``value`` (8 hex digits)."""
    return lambda body: re.sub(r"^(format \S+ \S+ \S+ \S+ \S+ \S+ \S+ \S+ \S+ \d+ )\S+",
                               rf"\g<1>{value}", body, count=1, flags=re.M)


def kernels_isa(isa: str):
    return lambda body: re.sub(r"^kernels \S+", f"kernels {isa}", body, count=1, flags=re.M)


def missing_isa() -> tuple[str, str]:
    """An instruction set this CPU lacks and the refusal it gets; an unknown name where the
    CPU has them all."""
    if cpu.machine_isa() != "avx512_vnni":
        return "avx512_vnni", "exported for the avx512_vnni CPU kernels, which this CPU cannot"
    return "avx1024", "names the instruction set 'avx1024' \\(known: scalar"


@pytest.mark.parametrize("change, message", [
    (flip_a_library_byte, "kernels_.*.so.b64 was damaged or changed: its SHA-256 does not match"),
    (lambda files: files.pop(library_entry()),
     "has no extra/qcompile/kernels_.*: the kernel library its manifest names is missing"),
    (lambda files: files.pop(native.MANIFEST),
     "has no extra/qcompile/native.txt: it was not made by qcompile.export"),
    (edit_manifest(first_table_value("3f000000"), reseal=False),
     "native.txt was damaged or changed: its SHA-256 does not match its last line"),
    (edit_manifest(lambda body: body.replace("int n, int k", "int k, int n", 1), reseal=True),
     "calls qcompile_cpu::.*this operator library defines"),
    (edit_manifest(lambda body: body.replace(native.VERSION, "qcompile-native 9"), reseal=True),
     "starts with 'qcompile-native 9', this operator library reads 'qcompile-native 1'"),
    (edit_manifest(kernels_isa(missing_isa()[0]), reseal=True), missing_isa()[1]),
])
def test_a_damaged_or_foreign_package_is_refused(package, tmp_path, change, message):
    n, error = register(rewritten(package, tmp_path / "bad.pt2", change))
    assert n == -1 and re.search(message, error), error
    assert error.startswith("qcompile: ") and str(tmp_path / "bad.pt2") in error


def test_a_file_that_is_not_an_archive_is_refused(tmp_path):
    (tmp_path / "x.pt2").write_bytes(b"not a zip archive" * 10)
    n, error = register(tmp_path / "x.pt2")
    assert n == -1 and "is not a readable .pt2 archive" in error


def test_tables_other_than_those_registered_under_the_same_id_are_refused(package, tmp_path):
    """The first registration of an id wins: a package whose tables differ from the ones this
    process runs under that id must not run on them."""
    assert register(package) == (3, "")  # the package's own tables (the real ones) first
    other = rewritten(package, tmp_path / "other.pt2",
                      edit_manifest(first_table_value("3f000000"), reseal=True))
    n, error = register(other)
    assert n == -1 and "is registered in this process with other tables" in error


@pytest.mark.slow
def test_the_cpp_example_runs_the_package_bit_for_bit(package, op_library, compiled_mlp,
                                                      tmp_path, request):
    """examples/cpp built with cmake as its README says (the build folder kept in pytest's
    cache), run on the package: its outputs equal the compiled model's; a package with a
    damaged kernel library is refused with the C entry's message."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed: the C++ example cannot be built here")
    build = request.config.cache.mkdir("qcompile-cpp-example")
    for cmd in (["cmake", "-S", str(ROOT / "examples/cpp"), "-B", str(build),
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                ["cmake", "--build", str(build)]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runner = str(build / "qcompile_run")
    for i, x in enumerate(inputs()):
        torch.save((x,), tmp_path / f"x{i}.pt")
        done = subprocess.run([runner, op_library, str(package), str(tmp_path / f"x{i}.pt"),
                               str(tmp_path / f"y{i}.pt")], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "registered 3 formats" in done.stdout
        (got,) = torch.load(tmp_path / f"y{i}.pt")
        assert torch.equal(got, compiled_mlp[i])
    bad = rewritten(package, tmp_path / "bad.pt2", flip_a_library_byte)
    done = subprocess.run([runner, op_library, str(bad), str(tmp_path / "x0.pt"),
                           str(tmp_path / "y.pt")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "was damaged or changed" in done.stderr
    assert not (tmp_path / "y.pt").exists()
