"""The integer W+A path's result, computed independently of every kernel from the reference
QTensors: exact int64 block dot products D_t, scaled by fl32(a_x a_w), summed in float32 in K
order (codegen/triton/linear.py states the formula). The oracle of the Triton and the CPU integer
kernels."""
import torch

import qcompile
from qcompile import formats
from qcompile.formats.packing import unpack


def int_operands(q):
    """Signed integer codes [rows, padded K] and a = multiplier * 2^-frac [rows, blocks], from a
    reference QTensor (K last)."""
    el = q.fmt.element
    rows = q.scales.shape[0]
    codes = unpack(q.codes.reshape(rows, -1), el.bits, q.scales.shape[-1] * q.block).long()
    signed = torch.where(codes >= 2 ** (el.bits - 1), codes - 2**el.bits, codes)
    a = q.fmt.scale.multiplier(q.scales, el, q.side) * 2.0 ** -el.frac_bits
    return signed, a


def int_formula(x, q, b, act):
    """The integer path's result, independently: exact int64 tile dot products, float32 rest."""
    af = formats.get(act)
    qx = qcompile.quantize(x, af, axis=-1)
    xi, ax = int_operands(qx)
    wi, aw = int_operands(q)
    if af.scale.kind == "pow2":  # the integers are exactly the reference fake-quantised operand
        xq = qcompile.fake_quantize(x, af, axis=-1).double()
        k = x.shape[1]
        recon = xi[:, :k].double() * ax.double().repeat_interleave(af.block_size, 1)[:, :k]
        assert torch.equal(recon, xq) or xq.isnan().any()
    t_len, k = af.block_size, x.shape[1]
    acc = torch.zeros(x.shape[0], wi.shape[0], dtype=torch.float32)
    for t in range(-(-k // t_len)):
        ks = slice(t * t_len, min((t + 1) * t_len, k))
        d = xi[:, ks] @ wi[:, ks].T  # int64, exact
        s = ax[:, t][:, None] * aw[:, (t * t_len) // q.block][None, :]  # float32
        acc = acc + d.to(torch.float32) * s
    return acc + b if b is not None else acc
