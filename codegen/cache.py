"""The generated-kernel cache: run exactly the source we generated; keep a copy for people.

``load_kernel(source, name)`` compiles the source *string* (``compile`` + ``exec`` into a fresh
module namespace), once per process per cache folder. Nothing is ever imported from the cache
folder: no path is imported and no bytecode is read (so a planted ``__pycache__/*.pyc`` is never
run), and a file swapped in after we wrote it is never read back.

Triton reads a kernel's source through ``inspect.getsource``, i.e. through ``linecache``: at
decoration time for compiled kernels (``JITFunction`` keeps it as ``.src``; the code generator
only uses ``co_filename`` as a label for line info), at the first launch under
TRITON_INTERPRET=1 (the interpreter rewrites the function's AST). Before executing we put the
exact source into ``linecache.cache`` under the code's filename, ``<qcompile kernel PATH>``,
where PATH names the readable copy. That entry has no mtime, so ``linecache.checkcache`` never
compares it with a file, and a name in angle brackets is never looked up on disk: if something
drops the entry, ``inspect`` fails loudly instead of reading a file.

The cache folder is ``qcompile.config.kernel_cache_setting()`` (QCOMPILE_KERNEL_CACHE, else
$XDG_CACHE_HOME/qcompile/kernels, else ~/.cache/qcompile/kernels). It holds ``qk_<digest>.py``,
the source for people to read (rewritten whenever its text is not exactly the source), and is
meant for the C++ kernel builds too (``cache_dir()``, ``write_atomically()``). The rule,
checked by ``cache_dir()`` once per process per folder:

- missing folders on the way to it are created one by one with mode 0o700;
- the cache folder itself, and every folder that was missing when we looked (created by us, or
  by a process racing us), must be *private*: a directory owned by the current user that group
  and others cannot write to. Anything else raises ``UnsafeCacheError`` naming the folder, the
  problem and the fix;
- folders that already existed above those are not checked: a world-writable sticky parent such
  as /tmp, or a shared group folder, is fine (they are where a private cache is made, not where
  files are written).

Where the OS has no POSIX owners (Windows) the owner and mode checks are skipped.
"""
from __future__ import annotations

import hashlib
import io
import linecache
import os
import stat
import sys
import tempfile
import types

from qcompile import config

_KERNELS: dict[tuple[str, str], types.ModuleType] = {}  # (folder, digest) -> executed source
_VERIFIED: set[str] = set()  # folders checked private in this process


class UnsafeCacheError(RuntimeError):
    """The kernel cache folder could be changed by another user."""


def _uid() -> int | None:
    """The current user's id; None where the OS has no POSIX owners."""
    return os.getuid() if hasattr(os, "getuid") else None


def _check_private(folder: str) -> None:
    st = os.stat(folder)
    uid = _uid()
    if not stat.S_ISDIR(st.st_mode):
        problem, fix = "is not a folder", f"remove {folder}"
    elif uid is not None and st.st_uid != uid:
        problem = f"is owned by user id {st.st_uid}, not by you (user id {uid})"
        fix = f"remove {folder} so that it is created again, or use a folder of your own"
    elif uid is not None and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"is writable by group or others (mode {oct(stat.S_IMODE(st.st_mode))})"
        fix = f"chmod go-w {folder}"
    else:
        return
    raise UnsafeCacheError(
        f"qcompile kernel cache: the folder {folder} {problem}, so someone else could change the "
        f"files in it. Fix: {fix}, or set QCOMPILE_KERNEL_CACHE to a private folder (yours, mode "
        f"0o700).")


def _make_dirs(path: str) -> list[str]:
    """Create the missing folders of ``path`` top down with mode 0o700. Returns the folders to
    check: ``path`` and every folder that was missing."""
    missing, p = [], path
    while not os.path.isdir(p) and os.path.dirname(p) != p:
        missing.append(p)
        p = os.path.dirname(p)
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            continue  # made by a racing process (or not a folder): _check_private decides
        os.chmod(p, 0o700)  # mkdir's mode went through the umask
    return missing or [path]


def cache_dir() -> str:
    """The kernel cache folder, created if missing and checked private (see the module doc)."""
    path = os.path.abspath(os.path.expanduser(config.kernel_cache_setting()))
    if path in _VERIFIED and os.path.isdir(path):
        return path
    for folder in _make_dirs(path):
        _check_private(folder)
    _VERIFIED.add(path)
    return path


def write_atomically(path: str, data: bytes | str) -> None:
    """Write ``data`` (a str as UTF-8) to ``path`` through a private temporary file (mode 0o600)
    in the same folder, then rename it over ``path``: a reader, or a process writing the same
    file at the same time, sees no file or a whole one, never half of one."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".qk_", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _execute(source: str, filename: str, module_name: str) -> types.ModuleType:
    """Run ``source`` itself as a new module; inspect (and so Triton) sees exactly this text."""
    # (size, mtime=None, lines, name): checkcache leaves an entry without an mtime alone.
    # StringIO splits on "\n" only, as compile() counts lines for our sources.
    linecache.cache[filename] = (len(source), None, io.StringIO(source).readlines(), filename)
    module = types.ModuleType(module_name)
    # dont_inherit: this file's `from __future__ import annotations` must not leak into kernels
    exec(compile(source, filename, "exec", dont_inherit=True), module.__dict__)
    return module


def load_kernel(source: str, name: str = "dequant_kernel"):
    """The kernel ``name`` defined by ``source``, executed from the string once per process per
    cache folder; a readable copy is kept in the folder as ``qk_<digest>.py``."""
    folder = cache_dir()
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    module = _KERNELS.get((folder, digest))
    if module is None:
        if config.dump_kernels():
            print(f"# ---- qcompile kernel {digest} ----\n{source}", file=sys.stderr, flush=True)
        path = os.path.join(folder, f"qk_{digest}.py")
        if _read(path) != source.encode():  # missing, or damaged/edited: rewrite the copy
            write_atomically(path, source)
        module = _execute(source, f"<qcompile kernel {path}>", f"qcompile_generated_{digest}")
        _KERNELS[(folder, digest)] = module
    return getattr(module, name)
