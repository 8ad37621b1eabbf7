"""The kernels' argument blocks as ctypes structures, read from args.h itself.

args.h is the one field list: every translation unit includes it, and the ctypes mirrors are
made here from its ``struct Name { ... };`` declarations (one field per declarator, in order),
so a field cannot be added on one side only. tests/test_cpu_structs.py checks the result
against the compiler's own ``sizeof`` / ``offsetof``.
"""
from __future__ import annotations

import ctypes
import re
from pathlib import Path

HEADER = Path(__file__).with_name("args.h")
_TYPES = {"int64_t": ctypes.c_int64, "int32_t": ctypes.c_int32, "float": ctypes.c_float}
_STRUCT = re.compile(r"^struct (\w+) \{\n(.*?)^\};", re.S | re.M)
_DECL = re.compile(r"^(?:const )?(\w+)\s*(\*?)\s*(\w+(?:\s*,\s*\w+)*)$")


def fields(text: str) -> dict[str, list[tuple[str, type]]]:
    """struct name -> [(field, ctypes type)] of every struct in the header text ``text``."""
    out = {}
    for name, body in _STRUCT.findall(text):
        body = re.sub(r"//[^\n]*", "", body)
        out[name] = [f for decl in body.split(";") if decl.strip()
                     for f in _declared(name, decl.strip())]
    return out


def _declared(struct: str, decl: str) -> list[tuple[str, type]]:
    match = _DECL.match(" ".join(decl.split()))
    if match is None:
        raise ValueError(f"codegen/cpu/args.h: struct {struct}: cannot read {decl!r} (write "
                         f"one 'type name, name;' per declaration, types: pointers, "
                         f"{', '.join(_TYPES)})")
    base, pointer, names = match.groups()
    if not pointer and base not in _TYPES:
        raise ValueError(f"codegen/cpu/args.h: struct {struct}: no ctypes type for {base!r}; "
                         f"use a pointer or one of {', '.join(_TYPES)}")
    kind = ctypes.c_void_p if pointer else _TYPES[base]
    return [(n.strip(), kind) for n in names.split(",")]


def _structure(name: str, field_list) -> type:
    return type(name, (ctypes.Structure,), {"_fields_": field_list,
                                            "__doc__": f"``struct {name}`` of args.h."})


_FIELDS = fields(HEADER.read_text())
Args = _structure("Args", _FIELDS["Args"])
ActArgs = _structure("ActArgs", _FIELDS["ActArgs"])
IntArgs = _structure("IntArgs", _FIELDS["IntArgs"])
STRUCTS = {"Args": Args, "ActArgs": ActArgs, "IntArgs": IntArgs}
