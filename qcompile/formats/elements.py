"""Element types: how one block element is encoded to a code and decoded to a value.

Each element is a frozen description (bit widths, bias, table) plus its reference arithmetic.
Inputs to ``encode`` are already divided by the block scale (float32, finite); codes are
unsigned integers in [0, 2**bits). Every rule here is the definition the Triton kernels must
reproduce bit for bit; docs/formats.md states the same rules in words.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from .bits import floor_log2, pow2, round_half_even

# Smallest float32 above sqrt(2): a mantissa m in [1, 2) rounds up in the log domain iff m >= this.
SQRT2_UP = torch.tensor(0x3FB504F4, dtype=torch.int32).view(torch.float32).item()


def _check_int(name, value, lo, hi):
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class IntElement:
    """Symmetric two's-complement integer times an implicit 2**-frac_bits; -2**(bits-1) unused."""

    bits: int
    frac_bits: int = 0
    emax: int = 0  # exponent of the element's top binade, for power-of-two block scales
    kind = "int"

    def __post_init__(self):
        _check_int("int element bits", self.bits, 2, 8)
        _check_int("frac_bits", self.frac_bits, 0, 16)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def max_value(self) -> float:
        return self.qmax * 2.0**-self.frac_bits

    def encode(self, n: torch.Tensor) -> torch.Tensor:
        q = round_half_even(n * 2.0**self.frac_bits).clamp(-self.qmax, self.qmax)
        return q.to(torch.int32) & (2**self.bits - 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        c = codes.to(torch.int32)
        signed = torch.where(c >= 2 ** (self.bits - 1), c - 2**self.bits, c)
        return signed.to(torch.float32) * 2.0**-self.frac_bits

    def carries(self, m: torch.Tensor) -> torch.Tensor:
        """Does m in [1, 2) (the top binade) round up to 2 on this element's grid?"""
        step = self.frac_bits + self.emax
        return round_half_even(m * 2.0**step) >= 2.0 ** (step + 1)

    def whole_tensor_side(self) -> dict:
        return {}

    def describe(self) -> str:
        scale = f" x 2^-{self.frac_bits}" if self.frac_bits else ""
        return f"INT{self.bits}{scale}"


@dataclass(frozen=True)
class FloatElement:
    """Sign + exp_bits exponent + man_bits mantissa minifloat with IEEE-style subnormals.

    specials: "none" (every code finite), "fn" (only S.1..1.1..1 is NaN, as OCP E4M3),
    "ieee" (top exponent holds Inf/NaN, as OCP E5M2). Encoding saturates at the max normal.
    """

    exp_bits: int
    man_bits: int
    bias: int | None = None  # default 2**(exp_bits-1) - 1
    specials: str = "none"
    kind = "float"

    def __post_init__(self):
        _check_int("exponent bits", self.exp_bits, 1, 5)
        _check_int("mantissa bits", self.man_bits, 0, 7)
        if self.exp_bits + self.man_bits + 1 > 8:
            raise ValueError(
                f"E{self.exp_bits}M{self.man_bits} needs {self.exp_bits + self.man_bits + 1} bits; "
                "elements are at most 8 bits wide")
        if self.specials not in ("none", "fn", "ieee"):
            raise ValueError(f"specials must be 'none', 'fn' or 'ieee', got {self.specials!r}")
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (self.exp_bits - 1) - 1)

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def emin(self) -> int:
        return 1 - self.bias

    @property
    def _top_exp_field(self) -> int:
        return 2**self.exp_bits - (2 if self.specials == "ieee" else 1)

    @property
    def max_value(self) -> float:
        top_man = 2**self.man_bits - (2 if self.specials == "fn" else 1)
        return (1 + top_man / 2**self.man_bits) * 2.0 ** (self._top_exp_field - self.bias)

    @property
    def emax(self) -> int:
        return self._top_exp_field - self.bias

    def encode(self, n: torch.Tensor) -> torch.Tensor:
        sign = torch.signbit(n).to(torch.int32) << (self.bits - 1)
        a = n.abs().clamp(max=self.max_value)
        # binade of a; zero and subnormals share the lowest one
        e = torch.where(a > 0, floor_log2(a), self.emin).clamp(min=self.emin)
        scaled = a * pow2(self.man_bits - e)  # in [0, 2**(M+1)), exact
        # base + floor(scaled) is the magnitude code below a, carries into the next binade
        # included. Ties go to the even code: the even mantissa when M >= 1, and for M = 0
        # (mantissa-free E2M0, E3M0) the even exponent field, as bit-level RNE does.
        base = (e - self.emin) << self.man_bits
        low = torch.floor(scaled)
        rest = scaled - low
        mag = base + low.to(torch.int32)
        up = (rest > 0.5) | ((rest == 0.5) & (mag % 2 == 1))
        return sign | (mag + up.to(torch.int32))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        c = codes.to(torch.int32)
        mag = c & (2 ** (self.bits - 1) - 1)
        exp_field = mag >> self.man_bits
        man = (mag & (2**self.man_bits - 1)).to(torch.float32)
        sub = man * 2.0 ** (self.emin - self.man_bits)
        norm = (man + 2**self.man_bits) * pow2(exp_field - self.bias - self.man_bits)
        v = torch.where(exp_field == 0, sub, norm)
        if self.specials == "ieee":
            top = exp_field == 2**self.exp_bits - 1
            v = torch.where(top, torch.where(man == 0, math.inf, math.nan), v)
        elif self.specials == "fn":
            v = torch.where(mag == 2 ** (self.bits - 1) - 1, math.nan, v)
        return torch.where(c >> (self.bits - 1) == 1, -v, v)

    def carries(self, m: torch.Tensor) -> torch.Tensor:
        return round_half_even(m * 2.0**self.man_bits) >= 2.0 ** (self.man_bits + 1)

    def whole_tensor_side(self) -> dict:
        return {}

    def describe(self) -> str:
        suffix = {"none": "", "fn": "fn (NaN only)", "ieee": " (IEEE Inf/NaN)"}[self.specials]
        return f"FP{self.bits} E{self.exp_bits}M{self.man_bits}{suffix}"


@dataclass(frozen=True)
class LogElement:
    """Sign + (bits-1)-bit code c: c = 0 is zero, else 2**(c - top) with top = 2**(bits-1) - 1.

    Rounding is to the nearest power of two in the log domain (|x| rounds up iff its mantissa
    exceeds sqrt(2)), clamped to [2**kmin, 1]; only an exact zero encodes to zero.
    """

    bits: int
    kind = "log"
    emax = 0
    max_value = 1.0

    def __post_init__(self):
        _check_int("log element bits", self.bits, 3, 8)

    @property
    def top(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def kmin(self) -> int:
        return 1 - self.top

    def encode(self, n: torch.Tensor) -> torch.Tensor:
        sign = torch.signbit(n).to(torch.int32) << (self.bits - 1)
        a = n.abs()
        m, e = torch.frexp(a)
        k = (e - 1) + (2 * m >= SQRT2_UP).to(torch.int32)
        mag = k.clamp(self.kmin, 0) - self.kmin + 1
        return sign | torch.where(a == 0, 0, mag).to(torch.int32)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        c = codes.to(torch.int32)
        mag = c & self.top
        v = torch.where(mag == 0, 0.0, pow2(mag - self.top))
        return torch.where(c >> (self.bits - 1) == 1, -v, v)

    def carries(self, m: torch.Tensor) -> torch.Tensor:
        return m >= SQRT2_UP

    def whole_tensor_side(self) -> dict:
        return {}

    def describe(self) -> str:
        return f"LOG{self.bits} (sign + {self.bits - 1}-bit exponent)"


@functools.lru_cache(maxsize=None)
def _table_on(values: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


@dataclass(frozen=True)
class CodebookElement:
    """A table of 2**bits ascending values in [-1, 1]; encode = nearest, ties to the lower code.

    The code of x is the number of midpoint thresholds strictly below x (bitsandbytes' rule);
    thresholds are float32 midpoints of neighbouring float32 values. ``values`` is None for a
    data-dependent codebook (quantile), which then travels with each QTensor.
    """

    bits: int
    table: str
    values: tuple[float, ...] | None = field(default=None, compare=False)
    kind = "codebook"
    emax = 0
    max_value = 1.0

    def __post_init__(self):
        _check_int("codebook bits", self.bits, 1, 8)
        if self.values is not None and len(self.values) != 2**self.bits:
            raise ValueError(f"codebook {self.table!r} has {len(self.values)} values, "
                             f"needs {2 ** self.bits}")

    @property
    def data_dependent(self) -> bool:
        return self.values is None

    def table_tensor(self, device=None) -> torch.Tensor:
        """The fixed table, float32, on ``device``: made once per table and device (kernels
        launch with it, so no host copy per call); shared, never to be written to."""
        return _table_on(self.values, torch.device(device if device is not None else "cpu"))

    @staticmethod
    def thresholds(table: torch.Tensor) -> torch.Tensor:
        t = table.to(torch.float64)
        return ((t[1:] + t[:-1]) / 2).to(torch.float32)

    def encode(self, n: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        table = self.table_tensor(n.device) if table is None else table
        return torch.searchsorted(self.thresholds(table), n.contiguous()).to(torch.int32)

    def decode(self, codes: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        table = self.table_tensor(codes.device) if table is None else table
        return table[codes.long()]

    def whole_tensor_side(self) -> dict:
        """Side tensors describing the whole tensor: name -> (dtype, shape). A data-dependent
        table travels with each tensor."""
        return {"codebook": (torch.float32, [2**self.bits])} if self.data_dependent else {}

    def describe(self) -> str:
        return f"{2 ** self.bits}-level codebook {self.table}"


Element = IntElement | FloatElement | LogElement | CodebookElement


@functools.lru_cache(maxsize=None)
def integer_grid(el) -> tuple[int, int] | None:
    """(s, top): every value of element ``el`` is an integer multiple of 2^-s (s >= 0 the
    smallest such) and |2^s v| <= top <= 127, so a code stands for a signed byte 2^s v that
    integer dot products can take (E2M1: s = 1, 2^s v in {0, 1, 2, 3, 4, 6, 8, 12} with signs);
    None where a value is not (NaN / Inf codes, a data-dependent or non-dyadic table) or 2^s v
    leaves the byte. Derived from the element's own value table; an int element's codes are its
    integers (s = frac_bits, top = qmax: its encoder never writes the code -2^(bits-1))."""
    if isinstance(el, IntElement):
        return el.frac_bits, el.qmax
    if getattr(el, "data_dependent", False):
        return None
    values = el.decode(torch.arange(2**el.bits)).to(torch.float32).tolist()
    if not all(math.isfinite(v) for v in values):
        return None
    s = max(v.as_integer_ratio()[1].bit_length() - 1 for v in values)  # denominators: 2^j
    top = max(abs(v) * 2**s for v in values)
    return (s, int(top)) if top <= 127 else None
