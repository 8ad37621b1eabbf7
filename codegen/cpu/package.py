"""What an exported package carries so that a process with no Python can register its formats:
the kernel library it was exported with and a plain-text manifest, both under the archive's
``extra/qcompile/`` folder, read by ``qc_register_package`` (package.cpp, in the operator
library; examples/cpp/ calls it). The library is stored in base64: torch reads every file under
``extra/`` as UTF-8 text when it loads a package.

The manifest: one record a line, fields separated by spaces, each float32 as the 8 hex digits
of its bits (exact, and read with strtoul):

    qcompile-native 1
    operator SCHEMA                           each operator the package calls, as torch prints it
    kernels ISA ENTRY SHA256 SOURCE_HASH      the kernel library: its archive entry (base64), the
                                              SHA-256 of its bytes, its qc_source_hash()
    format ID KEY LINEAR DECODE VALUES INT_LINEAR MAXV STEP WSTEP N T1..TN M M1..MM
                                              entry points (INT_LINEAR "-" for none), the element
                                              table (N values), the multipliers (M: 0 or 256)
    act ID KEY QUANTIZE BLOCK_SIZE SCALE RULE IS_SIGNED EMAX FRAC QMAX MAXV XSTEP
    sha256 HEX                                of every byte before this line

The fields are exactly what ``Plan.register`` / ``register_act`` (plans.py) hand
``qc_register`` / ``qc_register_act``, so a C++ process registers the tables that the Python one
does, bit for bit.
"""
from __future__ import annotations

import base64
import hashlib
import struct

from .build import library_bytes, library_file
from .plans import act_params

MANIFEST = "extra/qcompile/native.txt"
VERSION = "qcompile-native 1"


def kernel_entry(isa: str) -> str:
    """The archive entry of the kernel library for ``isa`` (its bytes in base64)."""
    return f"extra/qcompile/kernels_{isa}.so.b64"


def native_files(schemas: dict, plans: dict, acts: dict) -> dict[str, bytes]:
    """{archive entry: bytes}: the manifest and, if any format is named, the kernel library.
    ``schemas``: {operator: schema}; ``plans``: {format id: its registered Plan}; ``acts``:
    {activation id: (its format, the Plan of a weight it multiplies)}."""
    lines = [VERSION] + [f"operator {schema}" for _, schema in sorted(schemas.items())]
    files = {}
    isas = {p.isa for p in plans.values()}
    if len(isas) > 1:
        raise AssertionError(f"qcompile.export: formats registered for several instruction sets "
                             f"{sorted(isas)}")
    if isas:
        isa = isas.pop()
        entry, data = kernel_entry(isa), library_bytes(library_file(isa))
        source = next(iter(plans.values())).lib.qc_source_hash  # (a restype set by build.py)
        lines.append(f"kernels {isa} {entry} {hashlib.sha256(data).hexdigest()} "
                     f"{source().decode()}")
        files[entry] = base64.b64encode(data)
    lines += [_format_line(fmt_id, p) for fmt_id, p in sorted(plans.items())]
    lines += [_act_line(act_id, af, p) for act_id, (af, p) in sorted(acts.items())]
    body = "\n".join(lines) + "\n"
    files[MANIFEST] = (body + f"sha256 {hashlib.sha256(body.encode()).hexdigest()}\n").encode()
    return files


def _bits(*values) -> str:
    return " ".join(f"{struct.unpack('<I', struct.pack('<f', v))[0]:08x}" for v in values)


def _format_line(fmt_id: int, p) -> str:
    mult = p.mult_table.tolist() if p.mult_table is not None else []
    entry_points = [p.linear_fn.__name__, p.decode_fn.__name__, p.values_fn.__name__,
                    p.int_fn.__name__ if p.int_fn is not None else "-"]
    return " ".join(["format", str(fmt_id), p.fmt.key, *entry_points,
                     _bits(p.maxv, p.step, p.wstep), str(p.table.numel()),
                     _bits(*p.table.tolist()), str(len(mult)), _bits(*mult)]).rstrip()


def _act_line(act_id: int, af, p) -> str:
    a = act_params(af, af.block_size)
    ints = [af.block_size, a["scale"], a["rule"], a["is_signed"], a["emax"], a["frac"], a["qmax"]]
    return " ".join(["act", str(act_id), af.key, p.lib.qc_act_quantize.__name__,
                     *map(str, ints), _bits(a["maxv"], a["xstep"])])
