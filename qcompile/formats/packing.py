"""Bit packing of b-bit codes (1 <= b <= 8) along the last axis.

One rule for every width: codes form a big-endian bit stream, the first code in the most
significant bits of the first byte (for 4 bits: first element in the high nibble, as
bitsandbytes). Rows are padded with zero codes to a multiple of 8 codes, so a group of 8 codes
fills exactly b bytes.
"""
import torch


def packed_length(n_codes: int, bits: int) -> int:
    return -(-n_codes // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int codes [..., L] -> uint8 [..., packed_length(L, bits)], contiguous (kernels read the
    bytes in memory order)."""
    lead, n = codes.shape[:-1], codes.shape[-1]
    c = codes.to(torch.int64)
    pad = -n % 8
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    if bits == 8:
        return c.to(torch.uint8).contiguous()
    groups = c.reshape(*lead, c.shape[-1] // 8, 8)
    shifts = torch.arange(7, -1, -1, device=c.device) * bits
    word = (groups << shifts).sum(-1, keepdim=True)  # 8 * bits <= 56 bits
    byte_shifts = torch.arange(bits - 1, -1, -1, device=c.device) * 8
    return ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(*lead, groups.shape[-2] * bits)


def codes_at(packed: torch.Tensor, bits: int, row: torch.Tensor, col: torch.Tensor):
    """The codes at (row, col) of packed rows [rows, packed bytes], int64: the bytes holding
    each code's first bit and the next one, read as one 16-bit big-endian window."""
    bit = col * bits
    hi = packed[row, bit // 8].to(torch.int64)
    nxt = torch.clamp(bit // 8 + 1, max=packed.shape[1] - 1)
    lo = torch.where(bit % 8 + bits > 8, packed[row, nxt].to(torch.int64), 0)
    return (((hi << 8) | lo) >> (16 - bits - bit % 8)) & (2**bits - 1)


def unpack(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """uint8 [..., packed_length(n_codes, bits)] -> int32 codes [..., n_codes]."""
    lead = packed.shape[:-1]
    p = packed.to(torch.int64)
    if bits == 8:
        return p[..., :n_codes].to(torch.int32)
    groups = p.reshape(*lead, p.shape[-1] // bits, bits)
    byte_shifts = torch.arange(bits - 1, -1, -1, device=p.device) * 8
    word = (groups << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(7, -1, -1, device=p.device) * bits
    codes = (word >> shifts) & (2**bits - 1)
    return codes.reshape(*lead, groups.shape[-2] * 8)[..., :n_codes].to(torch.int32)
