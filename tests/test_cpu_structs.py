"""The argument blocks of the CPU kernels: the ctypes mirrors (codegen/cpu/structs.py, read from
args.h) have the layout the C++ compiler gives args.h. The oracle is the compiler itself: its
debug information (DWARF, read with readelf) lists every field of each struct with its offset,
whatever the Python reader understood of the header."""
import ctypes
import re
import shutil
import subprocess

import pytest

from qcompile import config
from qcompile.codegen.cpu import structs

pytestmark = pytest.mark.skipif(shutil.which("readelf") is None, reason="needs binutils' readelf")

_DIE = re.compile(r"^\s*<(\d+)><[0-9a-f]+>: Abbrev Number: \d+ \((DW_TAG_\w+)\)")
_ATTR = re.compile(r"^\s*<[0-9a-f]+>\s+(DW_AT_\w+)\s*:\s*(.*)$")


def compiler_layout(header, names, folder) -> dict:
    """struct -> (sizeof, [(field, offset)]) as the C++ compiler lays out ``header`` (its
    object file written in ``folder``)."""
    obj = folder / "layout.o"
    subprocess.run([config.cxx(), "-std=c++17", "-g", "-c", "-fno-eliminate-unused-debug-types",
                    "-x", "c++", str(header), "-o", str(obj)], check=True, capture_output=True)
    dump = subprocess.run(["readelf", "--debug-dump=info", str(obj)], check=True,
                          capture_output=True, text=True).stdout
    out, current, depth, die = {}, None, 0, None
    for line in dump.splitlines():
        if m := _DIE.match(line):
            level, tag = int(m.group(1)), m.group(2)
            if current is not None and level <= depth:
                current = None
            die = {"tag": tag, "level": level}
            if current is not None and tag == "DW_TAG_member" and level == depth + 1:
                out[current][1].append(die)
            continue
        if (m := _ATTR.match(line)) and die is not None:
            value = m.group(2).rsplit(": ", 1)[-1].strip()  # "(indirect string, ...): name"
            die[m.group(1)] = value
            if die["tag"] == "DW_TAG_structure_type" and m.group(1) == "DW_AT_byte_size" \
                    and die.get("DW_AT_name") in names:
                current, depth = die["DW_AT_name"], die["level"]
                out[current] = (int(value), [])
    return {name: (size, [(f["DW_AT_name"], int(f["DW_AT_data_member_location"]))
                          for f in members]) for name, (size, members) in out.items()}


def ctypes_layout(classes: dict) -> dict:
    return {name: (ctypes.sizeof(c), [(f, getattr(c, f).offset) for f, _ in c._fields_])
            for name, c in classes.items()}


def test_the_ctypes_mirrors_have_the_compilers_layout(tmp_path):
    got = ctypes_layout(structs.STRUCTS)
    assert set(got) == {"Args", "ActArgs", "IntArgs"}
    assert compiler_layout(structs.HEADER, set(got), tmp_path) == got


def test_a_field_on_one_side_only_is_caught(tmp_path):
    """The comparison above notices a field the mirrors lack, even one that fits in padding
    (after ActArgs' floats, before its pointers: no offset or size changes), and a field only
    the mirrors have."""
    text = structs.HEADER.read_text()
    header = tmp_path / "args.h"
    header.write_text(text.replace("float maxv, xstep;", "float maxv, xstep; int32_t extra;"))
    mirrors = ctypes_layout(structs.STRUCTS)
    c_side = compiler_layout(header, set(mirrors), tmp_path)
    assert c_side["ActArgs"][0] == mirrors["ActArgs"][0]  # the same size: padding took it
    assert c_side != mirrors
    extra = type("Args", (ctypes.Structure,), {
        "_fields_": structs.Args._fields_ + [("extra", ctypes.c_int64)]})
    header.write_text(text)
    assert compiler_layout(header, {"Args"}, tmp_path)["Args"] != ctypes_layout({"Args": extra})["Args"]


def test_the_header_reader_refuses_what_it_cannot_mirror():
    with pytest.raises(ValueError, match="no ctypes type for 'double'"):
        structs.fields("struct S {\n    double d;\n};\n")
    with pytest.raises(ValueError, match="cannot read"):
        structs.fields("struct S {\n    int64_t a[4];\n};\n")
    assert structs.fields("struct S {\n    const float* x; int64_t M, ldx;  // c\n};\n") == {
        "S": [("x", ctypes.c_void_p), ("M", ctypes.c_int64), ("ldx", ctypes.c_int64)]}
