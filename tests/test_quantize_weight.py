"""api.quantize_weight (a weight quantised a few rows at a time, to bound memory) gives the
QTensor that quantising the whole weight gives, bit for bit, for every preset format, both
axes, padded rows, NaN blocks and OPQ outliers; formats with whole-tensor side data are
quantised whole."""
import pytest
import torch

from qcompile import api, formats, quantize

FORMATS = formats.names() + ["int4[block_size=32]", "bof4s_opq[block_size=32]"]


def same(a, b):
    assert a.fmt == b.fmt and a.shape == b.shape and a.dtype == b.dtype
    assert (a.axis, a.block) == (b.axis, b.block)
    assert sorted(a.tensors()) == sorted(b.tensors())
    for name, t in a.tensors().items():
        u = b.tensors()[name]
        assert t.dtype == u.dtype and t.shape == u.shape, name
        assert torch.equal(t.view(torch.uint8) if t.is_floating_point() else t,
                           u.view(torch.uint8) if u.is_floating_point() else u), name


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("axis", [0, 1])
def test_in_pieces_equals_whole(monkeypatch, name, axis):
    g = torch.Generator().manual_seed(hash(name) % 2**31)
    w = torch.randn(37, 100, generator=g) * torch.logspace(-3, 3, 100)  # rows of all sizes
    w[5, 3] = 40.0  # an outlier for OPQ
    w[9, 60] = float("nan")
    w = w if axis == 1 else w.T.contiguous()
    monkeypatch.setattr(api, "CHUNK_ELEMENTS", 300)  # 3 rows a piece: 13 pieces
    same(api.quantize_weight(w, name, axis), quantize(w, name, axis=axis))


def test_bfloat16_and_a_single_piece():
    w = torch.randn(8, 64).bfloat16()
    same(api.quantize_weight(w, "nf4", 1), quantize(w, "nf4", axis=1))  # fewer rows than a piece


def test_whole_tensor_side_data_is_quantised_whole(monkeypatch):
    monkeypatch.setattr(api, "CHUNK_ELEMENTS", 64)
    calls = []
    real = api.quantize
    monkeypatch.setattr(api, "quantize", lambda *a, **k: calls.append(a[1].name) or real(*a, **k))
    w = torch.randn(32, 64)
    for name in ("nvfp4", "quantile4"):
        same(api.quantize_weight(w, name, 1), real(w, name, axis=1))
    assert calls == ["nvfp4", "quantile4"]  # each quantised whole, once
