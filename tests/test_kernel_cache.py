"""The generated-kernel cache (codegen/cache.py) only ever runs the exact text we generated.

The files in the cache folder are copies for people: a damaged, edited or swapped file, or a
planted __pycache__/*.pyc, is never executed, by Python or by Triton (interpreted or compiled).
The folder is private: created 0o700 under XDG_CACHE_HOME or ~/.cache, and one that others could
change is refused. The kernels run in Triton's interpreter (tests/kernel_device.py).
"""
import hashlib
import importlib.util
import inspect
import os
import py_compile
import stat
import subprocess
import sys

from kernel_device import dev, host  # noqa: E402  (before anything imports triton)

import pytest  # noqa: E402
import torch  # noqa: E402

import qcompile  # noqa: E402
from qcompile import formats  # noqa: E402
from qcompile.codegen import cache  # noqa: E402
from qcompile.codegen.triton import dequant as cg  # noqa: E402

SRC = cg.dequant_source(formats.get("int4"))
DIGEST = hashlib.sha256(SRC.encode()).hexdigest()[:16]


@pytest.fixture
def folder(monkeypatch, tmp_path):
    """A cache folder of the test's own (not yet created) and an empty per-process memo."""
    monkeypatch.setattr(cache, "_KERNELS", {})
    path = tmp_path / "kernels"
    monkeypatch.setenv("QCOMPILE_KERNEL_CACHE", str(path))
    return path


def check_int4(seed=0):
    """The generated int4 kernel, launched, equals the reference."""
    x = torch.linspace(-3, 3, 64).reshape(2, 32) + seed
    q = qcompile.quantize(x, "int4")
    assert torch.equal(host(qcompile.dequantize(dev(q), impl="triton")), qcompile.dequantize(q))


def malicious(marker, body=True) -> str:
    """SRC with the same lines, doing harm: it writes ``marker`` when imported (and, with
    ``body``, when the kernel runs in the interpreter) and triples every result."""
    lines = SRC.splitlines(keepends=True)
    lines[0] = f"open({str(marker)!r}, 'w').write('imported')\n"  # was the docstring
    text = "".join(lines).replace("value * mult", "value * mult * 3.0")
    if body:
        text = text.replace("pid_r = tl.program_id(0)",
                            f"pid_r = tl.program_id(0); open({str(marker)!r}, 'w').write('ran')")
    assert text.count("\n") == SRC.count("\n") and text != SRC
    return text


def private_dir(path):
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


# ---- only our text runs -------------------------------------------------------------------

def test_damaged_cache_copy_is_rewritten_never_run(folder, tmp_path, monkeypatch):
    entry = private_dir(folder) / f"qk_{DIGEST}.py"
    marker = tmp_path / "marker"
    # a truncated write, a file edited to do something else, bytes that are not UTF-8
    for damage in (SRC[: len(SRC) // 2], malicious(marker), b"\xff\xfe not utf-8"):
        entry.write_bytes(damage if isinstance(damage, bytes) else damage.encode())
        monkeypatch.setattr(cache, "_KERNELS", {})
        check_int4()
        assert entry.read_text() == SRC  # the copy for people is put right
    assert not marker.exists() and not list(folder.glob(".qk_*"))


def test_planted_pyc_is_not_executed(folder, tmp_path):
    """A __pycache__ entry whose header matches the (correct) cached .py would be what an import
    of the .py runs; we never import it."""
    entry = private_dir(folder) / f"qk_{DIGEST}.py"
    marker = tmp_path / "marker"
    bad = f"open({str(marker)!r}, 'w').write('imported')\ndequant_kernel = None\n"
    bad += "#" * (len(SRC) - len(bad) - 1) + "\n"  # same size as the real source...
    planted = tmp_path / "planted.py"
    planted.write_text(bad)
    entry.write_text(SRC)
    mtime = planted.stat().st_mtime_ns
    os.utime(entry, ns=(mtime, mtime))  # ...and the same mtime: the .pyc header matches
    pyc = importlib.util.cache_from_source(str(entry))
    py_compile.compile(str(planted), cfile=pyc, dfile=str(entry), doraise=True)
    header = open(pyc, "rb").read(16)
    assert int.from_bytes(header[8:12], "little") == int(entry.stat().st_mtime)
    assert int.from_bytes(header[12:16], "little") == entry.stat().st_size
    check_int4()
    assert not marker.exists()


@pytest.mark.parametrize("when", ["at_write", "after_load"])
def test_file_swapped_after_generation_is_never_run(folder, tmp_path, monkeypatch, when):
    """Another writer replaces the file right after we wrote it (before we would have imported
    it), or after the kernel was loaded (before its first launch, when the interpreter reads the
    kernel's source): our text runs, and Triton sees our text."""
    marker = tmp_path / "marker"
    write = cache.write_atomically

    def racing_write(path, data):
        write(path, data)
        write(path, malicious(marker))  # the other writer wins

    if when == "at_write":
        monkeypatch.setattr(cache, "write_atomically", racing_write)
    kernel = cache.load_kernel(SRC)
    entry = folder / f"qk_{DIGEST}.py"
    if when == "after_load":
        write(str(entry), malicious(marker))
    assert entry.read_text() == malicious(marker)  # the swap happened
    check_int4()
    assert not marker.exists()
    # what Triton reads (the interpreter at the first launch, the compiler at decoration)
    fn_src = inspect.getsource(kernel.fn)
    assert fn_src.startswith("@triton.jit\ndef dequant_kernel(") and fn_src in SRC
    if hasattr(kernel, "src"):  # a JITFunction (on a GPU): the source it compiles
        assert kernel.src in SRC and kernel.src.startswith("def dequant_kernel(")


_REAL_COMPILE = r"""
import sys
from qcompile import formats
from qcompile.codegen import cache
from qcompile.codegen.triton import dequant
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

src, bad = dequant.dequant_source(formats.get("int4")), sys.argv[1]
write = cache.write_atomically
cache.write_atomically = lambda path, data: (write(path, data), write(path, bad))  # the race
k = cache.load_kernel(src)
assert isinstance(k, triton.runtime.jit.JITFunction)  # the real compile path
assert k.src in src and "3.0" not in k.src, k.src
sig = {n: "*u8" if n == "codes_ptr" else "*fp32" if n.endswith("_ptr") else
       "constexpr" if n.isupper() else "i32" for n in k.arg_names}
c = triton.compile(ASTSource(k, sig, {"BLOCK_R": 4, "BLOCK_C": 256}),
                   target=GPUTarget("cuda", 90, 32))
print("TTIR", c.asm["ttir"])
"""


def test_real_triton_compile_uses_our_source_not_the_file(tmp_path):
    """Without the interpreter, Triton's JITFunction and its compiler (down to a cubin for sm_90,
    no GPU needed) work from our text even though the file on disk was swapped."""
    marker = tmp_path / "marker"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(QCOMPILE_KERNEL_CACHE=str(tmp_path / "kernels"),
               TRITON_CACHE_DIR=str(tmp_path / "triton"))
    done = subprocess.run([sys.executable, "-c", _REAL_COMPILE, malicious(marker, body=False)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ttir = done.stdout.split("TTIR", 1)[1]
    assert "7.000000e+00" in ttir and "3.000000e+00" not in ttir  # our divisor, not the tripling
    assert (tmp_path / "kernels" / f"qk_{DIGEST}.py").read_text() != SRC  # the swap happened
    assert not marker.exists()


_COMPILE_ONE = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch, qcompile
x = torch.linspace(-2, 2, 96).reshape(3, 32)
q = qcompile.quantize(x, "bof4s")
assert torch.equal(qcompile.dequantize(q, impl="triton"), qcompile.dequantize(q))
"""


def test_processes_compiling_at_once_share_one_cache(tmp_path):
    env = {**os.environ, "QCOMPILE_KERNEL_CACHE": str(tmp_path / "kernels"),
           "TRITON_INTERPRET": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _COMPILE_ONE], env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    entries = list((tmp_path / "kernels").glob("qk_*.py"))
    assert len(entries) == 1 and not list((tmp_path / "kernels").glob(".qk_*"))
    assert entries[0].read_text() == cg.dequant_source(formats.get("bof4s"))
    assert stat.S_IMODE((tmp_path / "kernels").stat().st_mode) == 0o700


# ---- the folder: private, in the user's cache -----------------------------------------------

def test_default_folder_is_under_xdg_cache_or_home_and_private(monkeypatch, tmp_path):
    monkeypatch.setattr(cache, "_KERNELS", {})
    monkeypatch.delenv("QCOMPILE_KERNEL_CACHE", raising=False)
    old_umask = os.umask(0)  # a permissive umask must not loosen the folders we create
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert cache.cache_dir() == str(tmp_path / "xdg" / "qcompile" / "kernels")
        monkeypatch.delenv("XDG_CACHE_HOME")
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        home = tmp_path / "home" / ".cache" / "qcompile" / "kernels"
        assert cache.cache_dir() == str(home)
        cache.load_kernel(SRC)
    finally:
        os.umask(old_umask)
    assert (home / f"qk_{DIGEST}.py").read_text() == SRC
    for made in (tmp_path / "xdg", tmp_path / "xdg" / "qcompile", tmp_path / "xdg" / "qcompile" /
                 "kernels", tmp_path / "home", home.parent.parent, home.parent, home):
        assert stat.S_IMODE(made.stat().st_mode) == 0o700, made
    assert stat.S_IMODE((home / f"qk_{DIGEST}.py").stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777])
def test_folder_writable_by_others_is_refused(folder, mode):
    private_dir(folder).chmod(mode)
    with pytest.raises(cache.UnsafeCacheError) as err:
        cache.load_kernel(SRC)
    message = str(err.value)
    assert str(folder) in message and "writable by group or others" in message
    assert f"chmod go-w {folder}" in message and "QCOMPILE_KERNEL_CACHE" in message
    assert not list(folder.iterdir())  # nothing written into it
    folder.chmod(0o700)  # fixed as the message says: accepted (a refusal is not remembered)
    check_int4()


def test_folder_made_by_a_racing_process_is_checked(folder, monkeypatch):
    """A folder on the way that someone else creates between our look and our mkdir is checked
    like the cache folder itself."""
    mkdir = os.mkdir

    def raced(path, mode=0o777):
        mkdir(path)
        os.chmod(path, 0o777)  # the other process won, world-writable
        raise FileExistsError(path)

    monkeypatch.setattr(cache.os, "mkdir", raced)
    with pytest.raises(cache.UnsafeCacheError, match="writable by group or others"):
        cache.cache_dir()


def test_sticky_world_writable_parent_is_fine(monkeypatch, tmp_path):
    shared = tmp_path / "shared"  # like /tmp
    shared.mkdir()
    shared.chmod(0o1777)
    monkeypatch.setenv("QCOMPILE_KERNEL_CACHE", str(shared / "mine" / "kernels"))
    assert cache.cache_dir() == str(shared / "mine" / "kernels")
    assert stat.S_IMODE((shared / "mine").stat().st_mode) == 0o700


def test_folder_owned_by_another_user_is_refused(folder, monkeypatch):
    private_dir(folder)
    # tests run as root, who owns every folder here: be another user instead
    monkeypatch.setattr(cache, "_uid", lambda: folder.stat().st_uid + 1000)
    with pytest.raises(cache.UnsafeCacheError) as err:
        cache.load_kernel(SRC)
    message = str(err.value)
    assert str(folder) in message and f"owned by user id {folder.stat().st_uid}" in message
    assert "QCOMPILE_KERNEL_CACHE" in message
    assert not list(folder.iterdir())


def test_a_file_for_a_folder_is_refused(folder):
    folder.write_text("not a folder")
    with pytest.raises(cache.UnsafeCacheError, match="is not a folder"):
        cache.cache_dir()


def test_folder_checks_run_once_per_process_per_folder(folder, monkeypatch):
    checked = []
    check = cache._check_private
    monkeypatch.setattr(cache, "_check_private", lambda f: (checked.append(f), check(f)))
    for name in ("int4", "nf4", "mxfp4"):
        cache.load_kernel(cg.dequant_source(formats.get(name)))
    check_int4()
    assert checked == [str(folder)]


def test_write_atomically_writes_text_or_bytes_whole_and_private(tmp_path):
    path = tmp_path / "lib.so"
    cache.write_atomically(str(path), b"\x7fELF\x00")
    assert path.read_bytes() == b"\x7fELF\x00"
    cache.write_atomically(str(path), "caf\u00e9\n")
    assert path.read_bytes() == "caf\u00e9\n".encode()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and os.listdir(tmp_path) == ["lib.so"]
    with pytest.raises(TypeError):
        cache.write_atomically(str(path), 3)
    assert os.listdir(tmp_path) == ["lib.so"]  # a failed write leaves no temporary behind

