"""Every number format, described once: element type + block scale + block size (+ options).

``names()`` lists the presets, ``get(name, **overrides)`` returns a ``Format``. Besides the
presets, families take their parameters in the name: ``int5``, ``fp5_e2m2``, ``bfp7``, ``bl6``,
``dynexp6``. A format's ``key`` (e.g. ``"mxfp4[block_size=16,scale_rule=ceil]"``) round-trips
through ``get``. The same description drives the reference, packing, docs and codegen.
"""
from __future__ import annotations

import math
import numbers
import operator
import re
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from . import codebooks
from .elements import CodebookElement, Element, FloatElement, IntElement, LogElement
from .scales import POW2_RULES, AbsmaxScale, NVFP4Scale, Pow2Scale, Scale

OPQ_DEFAULT_Q = 0.95
OVERRIDES = ("block_size", "scale_rule", "opq", "proxy")
PROXY_RANGE = ("a fraction of the input columns in (0, 1) (e.g. 0.02) or a count of columns "
               "(an integer >= 1), or None (no proxy columns)")

MX = "OCP Microscaling Formats (MX) v1.0"
ZHANG = "Zhang et al., EMNLP 2023 (arXiv:2310.05079)"
DETTMERS = "Dettmers & Zettlemoyer, ICML 2023 (arXiv:2212.09720)"
BOF4 = "BOF4 paper (arXiv:2505.06653)"


@dataclass(frozen=True)
class Format:
    name: str
    element: Element
    scale: Scale
    block_size: int | None  # None: one block per whole row of the quantised axis
    source: str
    opq: float | None = None  # outlier-preserving quantisation quantile q (BOF4 paper), or None
    preset: str = ""  # the preset this came from, for the key
    # proxy quantisation (Dettmers & Zettlemoyer): the input columns (positions along the
    # quantised axis) that score highest, a fraction or a count, kept in bfloat16; the scores
    # come from the previous layer's weights (qcompile.proxy), not from this tensor
    proxy: float | int | None = None

    def __post_init__(self):
        object.__setattr__(self, "block_size", _check_block_size(self.block_size))
        if self.opq is not None:
            if isinstance(self.opq, bool) or not isinstance(self.opq, numbers.Real):
                raise ValueError(f"opq must be a quantile in (0, 1) or None, got {self.opq!r}")
            if self.scale.kind != "absmax":
                raise ValueError(f"OPQ needs an absmax-scaled format; {self.name} uses "
                                 f"{self.scale.describe()}")
            if not 0.0 < float(self.opq) < 1.0:
                raise ValueError(f"opq quantile must lie in (0, 1), got {self.opq!r}")
            object.__setattr__(self, "opq", float(self.opq))
        object.__setattr__(self, "proxy", _check_proxy(self.proxy))
        if self.scale.kind == "pow2" and self.element.kind == "codebook":
            raise ValueError("codebook elements need an absmax scale, not a power-of-two one")

    @property
    def bits(self) -> int:
        return self.element.bits

    def block_for(self, row_length: int) -> int:
        """The block length used on rows of ``row_length`` elements: ``block_size``, clamped to
        the row (a block longer than the row holds the row; so does ``block_size=None``)."""
        k = max(int(row_length), 1)
        return min(self.block_size, k) if self.block_size is not None else k

    def proxy_count(self, row_length: int) -> int:
        """How many input columns of rows of ``row_length`` the proxy option keeps: a count as
        given (at most the row), a fraction rounded up (at least that share, at least one)."""
        k = max(int(row_length), 1)
        if self.proxy is None:
            return 0
        if isinstance(self.proxy, int):
            return min(self.proxy, k)
        return min(k, max(1, math.ceil(round(self.proxy * k, 9))))  # 0.02 * 600 is 12, not 13

    def effective_bits(self, row_length: int | None = None) -> float:
        """Bits per element counting the block scale, for rows of ``row_length`` elements when
        given (a whole-row block, or a block longer than the row, holds one row: one scale per
        row); without it, at ``block_size`` (a whole-row block then counts no scale).

        Side data (OPQ outliers, proxy columns, a quantile table, NVFP4's tensor scale) is not in
        this nominal figure; QTensor.bits_per_element counts everything actually stored."""
        block = self.block_for(row_length) if row_length else self.block_size
        return self.element.bits + (self.scale.bits / block if block else 0.0)

    @property
    def whole_tensor_side(self) -> dict:
        """The side tensors that describe the whole tensor rather than a block (NVFP4's tensor
        scale, a quantile table), name -> (dtype, shape), in the order quantize stores them:
        such a tensor is quantised whole, and its decode tables come from its side data."""
        return {**self.scale.whole_tensor_side(), **self.element.whole_tensor_side()}

    @property
    def key(self) -> str:
        base = get(self.preset) if self.preset else None
        diffs = []
        if base is None or base.block_size != self.block_size:
            diffs.append(f"block_size={self.block_size}")
        if self.scale.kind == "pow2" and (base is None or base.scale != self.scale):
            diffs.append(f"scale_rule={self.scale.rule}")
        if base is None or base.opq != self.opq:
            diffs.append(f"opq={self.opq}")
        if self.proxy is not None:
            diffs.append(f"proxy={self.proxy}")
        return self.preset + (f"[{','.join(diffs)}]" if diffs else "")

    def __str__(self) -> str:
        return self.key


def _mx(element):
    return dict(element=element, scale=Pow2Scale("floor"), block_size=32, source=MX)


def _bfp(width):
    return dict(element=IntElement(width, frac_bits=width - 1), scale=Pow2Scale("ceil"),
                block_size=16, source=ZHANG)


def _block_log(width):
    return dict(element=LogElement(width), scale=Pow2Scale("even"), block_size=16, source=ZHANG)


def _absmax_int(bits):
    return dict(element=IntElement(bits), scale=AbsmaxScale(), block_size=64, source=DETTMERS)


def _absmax_float(exp_bits, man_bits):
    return dict(element=FloatElement(exp_bits, man_bits), scale=AbsmaxScale(), block_size=64,
                source=DETTMERS)


def _dynexp(bits):
    return dict(element=CodebookElement(bits, f"dynexp{bits}",
                                        codebooks.dynamic_exponent_map(bits, bits - 1)),
                scale=AbsmaxScale(), block_size=64, source=DETTMERS)


def _shipped(table, signed=False, source=BOF4):
    return dict(element=CodebookElement(4, table, codebooks.table(table)),
                scale=AbsmaxScale(signed=signed), block_size=64, source=source)


# name -> zero-argument builder of the Format fields (built lazily: codebooks load on demand)
_PRESETS = {
    "mxfp8_e4m3": lambda: _mx(FloatElement(4, 3, specials="fn")),
    "mxfp8_e5m2": lambda: _mx(FloatElement(5, 2, specials="ieee")),
    "mxfp6_e3m2": lambda: _mx(FloatElement(3, 2)),
    "mxfp6_e2m3": lambda: _mx(FloatElement(2, 3)),
    "mxfp4": lambda: _mx(FloatElement(2, 1)),
    "mxint8": lambda: _mx(IntElement(8, frac_bits=6)),
    "nvfp4": lambda: dict(element=FloatElement(2, 1), scale=NVFP4Scale(), block_size=16,
                          source="NVIDIA NVFP4 (Blackwell); E2M1 elements per OCP MX"),
    "bfp8": lambda: _bfp(8),
    "bfp6": lambda: _bfp(6),
    "bfp4": lambda: _bfp(4),
    "bm8": lambda: dict(element=FloatElement(4, 3), scale=Pow2Scale("floor"), block_size=16,
                        source=ZHANG),
    "bl8": lambda: _block_log(8),
    "int8": lambda: _absmax_int(8),
    "int4": lambda: _absmax_int(4),
    "int3": lambda: _absmax_int(3),
    "fp4_e2m1": lambda: _absmax_float(2, 1),
    "fp4_e3m0": lambda: _absmax_float(3, 0),
    "fp3_e2m0": lambda: _absmax_float(2, 0),
    "dynexp4": lambda: _dynexp(4),
    "dynexp8": lambda: _dynexp(8),
    "quantile4": lambda: dict(element=CodebookElement(4, "quantile (per tensor)"),
                              scale=AbsmaxScale(), block_size=64, source=DETTMERS),
    "nf4": lambda: _shipped("nf4", source="Dettmers et al., QLoRA 2023; bitsandbytes"),
    "af4": lambda: _shipped("af4", source="Yoshida, arXiv:2306.06965"),
    "bof4": lambda: _shipped("bof4_mse_b64"),
    "bof4s": lambda: _shipped("bof4s_mse_b64", signed=True),
    "bof4_mae": lambda: _shipped("bof4_mae_b64"),
    "bof4s_mae": lambda: _shipped("bof4s_mae_b64", signed=True),
    "bof4s_opq": lambda: dict(_shipped("bof4s_mse_b64", signed=True), opq=OPQ_DEFAULT_Q),
}

# Families whose parameters are part of the name.
_PATTERNS = [
    (re.compile(r"int([2-8])"), lambda m: _absmax_int(int(m[1]))),
    (re.compile(r"fp([2-8])_e(\d)m(\d)"), lambda m: _float_pattern(*map(int, m.groups()))),
    (re.compile(r"bfp([3-8])"), lambda m: _bfp(int(m[1]))),
    (re.compile(r"bl([3-8])"), lambda m: _block_log(int(m[1]))),
    (re.compile(r"dynexp([3-8])"), lambda m: _dynexp(int(m[1]))),
]


def _float_pattern(width, exp_bits, man_bits):
    name = f"fp{width}_e{exp_bits}m{man_bits}"
    valid = ", ".join(f"fp{width}_e{e}m{width - 1 - e}" for e in range(1, min(5, width - 1) + 1))
    if 1 + exp_bits + man_bits != width:
        raise ValueError(f"{name}: 1 sign + {exp_bits} exponent + {man_bits} mantissa bits = "
                         f"{1 + exp_bits + man_bits}, not {width}; valid: {valid}")
    if not 1 <= exp_bits <= 5:
        raise ValueError(f"{name}: exponent bits must be 1..5, got {exp_bits}; valid: {valid}")
    return _absmax_float(exp_bits, man_bits)


def names() -> list[str]:
    """The preset names (families such as int5 or fp5_e3m1 are accepted by get() as well)."""
    return list(_PRESETS)


_KEY = re.compile(r"([a-z0-9_]+)(?:\[(.*)\])?")
BLOCK_SIZE_RANGE = ("a positive integer (1 or more; a block longer than the row is clamped to "
                    "the row) or None (one block per whole row)")


def _check_proxy(p):
    """proxy as stored: None, an int count >= 1, or a float fraction in (0, 1)."""
    if p is None:
        return None
    if isinstance(p, numbers.Integral) and not isinstance(p, bool):
        if p >= 1:
            return operator.index(p)
    elif isinstance(p, numbers.Real) and not isinstance(p, bool) and 0.0 < float(p) < 1.0:
        return float(p)
    raise ValueError(f"format option proxy must be {PROXY_RANGE}, got {p!r}")


def _check_block_size(bs):
    """block_size as stored: a positive int (integer types such as numpy's become int), or
    None. Anything else (0, negatives, floats, strings, bools) is rejected with the range."""
    if bs is None:
        return None
    if isinstance(bs, numbers.Integral) and not isinstance(bs, bool):
        bs = operator.index(bs)
    if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
        raise ValueError(f"block_size must be {BLOCK_SIZE_RANGE}, got {bs!r}")
    return bs


def _parse_value(option: str, text: str):
    """A key's option value (lower-cased text) as the keyword argument would give it."""
    if option == "block_size":
        if text == "none":
            return None
        # an integer literal; anything else goes on to be rejected with the valid range
        return int(text) if re.fullmatch(r"[+-]?[0-9]+", text) else text
    if option == "opq":
        if text in ("true", "false", "none"):
            return {"true": True, "false": False, "none": None}[text]
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"format option opq={text!r}: expected true (q = {OPQ_DEFAULT_Q}), "
                             "false or none (no OPQ), or a quantile q in (0, 1)") from None
    if option == "proxy":
        if text == "none":
            return None
        try:
            return int(text) if re.fullmatch(r"[+-]?[0-9]+", text) else float(text)
        except ValueError:
            raise ValueError(f"format option proxy={text!r}: expected {PROXY_RANGE}") from None
    return text  # scale_rule (checked with the others in _override); unknown options too


def key_rebuilds(fmt: Format) -> bool:
    """Whether ``get(fmt.key)`` gives ``fmt`` back (a Format built by hand may have no such key):
    what a format must satisfy to be written to a file by its key."""
    try:
        return get(fmt.key) == fmt
    except (ValueError, TypeError):
        return False


def get(name, **overrides) -> Format:
    """A Format by preset name, family name or key, with optional overrides
    (block_size=int >= 1|None, scale_rule='floor'|'ceil'|'rceil'|'even', opq=True|False|None|
    a quantile in (0, 1), proxy=a fraction in (0, 1)|a count >= 1|None). A key takes the same
    options as text: ``int4[block_size=128]``, ``nf4[block_size=none]``, ``nf4[opq=true]``,
    ``mxfp4[scale_rule=ceil]``, ``int3[proxy=0.02]``."""
    # a format's tables are CPU tensors whatever the default device: transformers loads models
    # under ``torch.device("meta")``, where a table built on the fly could not be read
    with torch.device("cpu"):
        if isinstance(name, str) and not overrides:
            return _get_key(name)
        return _build(name, **overrides)


@lru_cache(maxsize=1024)
def _get_key(name: str) -> Format:
    """Each key is parsed once: compiled graphs look their formats up on every call."""
    return _build(name)


def _build(name, **overrides) -> Format:
    if isinstance(name, Format):
        return _override(name, overrides) if overrides else name
    if not isinstance(name, str):
        raise TypeError(f"a format is a name or a Format, got {type(name).__name__}")
    m = _KEY.fullmatch(name.strip().lower())
    if not m:
        raise ValueError(f"malformed format {name!r}; expected e.g. 'mxfp4' or 'int4[block_size=128]'")
    base, args = m[1], m[2]
    if args:
        seen = set()
        for item in args.split(","):
            k, sep, v = item.partition("=")
            k = k.strip()
            if not sep:
                raise ValueError(f"malformed override {item!r} in {name!r}; expected key=value")
            if k in seen:
                raise ValueError(f"format option {k} given twice in {name!r}")
            seen.add(k)
            overrides.setdefault(k, _parse_value(k, v.strip()))
    if base in _PRESETS:
        fields = _PRESETS[base]()
    else:
        for pattern, build in _PATTERNS:
            pm = pattern.fullmatch(base)
            if pm:
                fields = build(pm)
                break
        else:
            raise ValueError(f"unknown format {name!r}; presets: {', '.join(names())}; "
                             "families: int<2-8>, fp<w>_e<E>m<M>, bfp<3-8>, bl<3-8>, dynexp<3-8>")
    fmt = Format(name=base, preset=base, **fields)
    return _override(fmt, overrides) if overrides else fmt


def _override(fmt: Format, overrides: dict) -> Format:
    unknown = set(overrides) - set(OVERRIDES)
    if unknown:
        raise ValueError(f"unknown format option(s) {sorted(unknown)}; valid: {', '.join(OVERRIDES)}")
    if "scale_rule" in overrides:
        rule = overrides["scale_rule"]
        if fmt.scale.kind != "pow2":
            raise ValueError(f"{fmt.name} has a {fmt.scale.describe()} scale; scale_rule applies "
                             f"only to power-of-two (E8M0) scales: {', '.join(POW2_RULES)}")
        if rule not in POW2_RULES:
            raise ValueError(f"format option scale_rule: unknown scale rule {rule!r}; choose one "
                             f"of {', '.join(POW2_RULES)}")
        fmt = replace(fmt, scale=Pow2Scale(rule))
    if "block_size" in overrides:
        fmt = replace(fmt, block_size=overrides["block_size"])
        el = fmt.element
        if el.kind == "codebook" and el.table.startswith("bof4"):
            stem = el.table.rsplit("_b", 1)[0]
            table = codebooks.block_table(stem, fmt.block_size)
            fmt = replace(fmt, element=CodebookElement(4, table, codebooks.table(table)))
    if "opq" in overrides:
        q = overrides["opq"]
        q = OPQ_DEFAULT_Q if q is True else (None if q is False else q)
        if q is not None and (isinstance(q, bool) or not isinstance(q, numbers.Real)):
            raise ValueError(f"format option opq={q!r}: expected True (q = {OPQ_DEFAULT_Q}), "
                             "False or None (no OPQ), or a quantile q in (0, 1)")
        fmt = replace(fmt, opq=q)
    if "proxy" in overrides:
        fmt = replace(fmt, proxy=overrides["proxy"])
    return fmt


def markdown_table() -> str:
    """The formats table of docs/formats.md, generated from the descriptions."""
    rows = ["| format | element | block | scale | bits / element | source |",
            "|---|---|---|---|---|---|"]
    for n in names():
        f = get(n)
        opq = " + OPQ outliers (bf16)" if f.opq else ""
        rows.append(f"| `{n}` | {f.element.describe()} | {f.block_size} | "
                    f"{f.scale.describe()}{opq} | {f.effective_bits():.3f} | {f.source} |")
    return "\n".join(rows)

