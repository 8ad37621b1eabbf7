"""The Triton emitters' registry (codegen/triton/emit.py) and the kernels' operands.

Every generated kernel's signature is read back from its source: an extra operand (beyond the
activations, codes, scales, bias and outputs) has one name in every kernel, and appears in a
signature only where the kernel's body reads it. No kernel is launched here.
"""
import dataclasses
import re

import jinja2
import pytest
import torch

from qcompile import formats
from qcompile.codegen import select
from qcompile.codegen.select import NoKernel
from qcompile.codegen.triton import emit
from qcompile.codegen.triton import linear as lin
from qcompile.codegen.triton.dequant import dequant_source
from qcompile.codegen.triton.quant import quant_source

FAMILIES = ["fp5_e2m2", "int5", "bfp7", "bfp3", "bl6", "dynexp6", "int2", "fp7_e3m3"]
FIXED = {"x_ptr", "xq_ptr", "ax_ptr", "codes_ptr", "scales_ptr", "bias_ptr", "out_ptr", "ws_ptr"}
# what each extra operand holds, one name each (docs/architecture.md, "Generated kernels")
EXTRA = {"table_ptr", "thr_ptr", "tensor_scale_ptr"}


def signature_and_body(src: str) -> tuple[list[str], str]:
    m = re.search(r"def \w+_kernel\((.*?)\):\n", src, re.S)
    params = [p.split(":")[0].strip() for p in m.group(1).split(",") if p.strip()]
    return params, src[m.end():]


def sources(name):
    fmt = formats.get(name)
    yield "dequant", dequant_source(fmt)
    yield "quant", quant_source(fmt)
    for variant in ("gemv", "gemm"):
        yield f"linear {variant}", lin.linear_source(fmt, variant=variant, interpret=True)


@pytest.mark.parametrize("name", formats.names() + FAMILIES)
def test_every_operand_is_read_where_it_is_passed(name):
    for kernel, src in sources(name):
        params, body = signature_and_body(src)
        extra = {p for p in params if p.endswith("_ptr")} - FIXED
        assert extra <= EXTRA, f"{name} {kernel}: operands {sorted(extra - EXTRA)}"
        for p in extra:
            assert re.search(rf"\b{p}\b", body), f"{name} {kernel}: {p} passed, never read"


def test_one_name_per_operand_across_kernels():
    """NVFP4's tensor scale is tensor_scale_ptr in the dequantise, quantise and linear kernels;
    a 4-bit fixed codebook decodes in registers (no table), a quantile table is gathered."""
    for kernel, src in sources("nvfp4"):
        assert "tensor_scale_ptr" in signature_and_body(src)[0], kernel
    for name, table in (("nf4", False), ("bof4s", False), ("quantile4", True), ("dynexp8", True)):
        for kernel, src in sources(name):
            params = signature_and_body(src)[0]
            assert ("table_ptr" in params) == (table and kernel != "quant"), (name, kernel)
            assert ("thr_ptr" in params) == (kernel == "quant"), (name, kernel)


@dataclasses.dataclass(frozen=True)
class PositElement:  # a kind with no emitter
    bits: int = 8
    kind = "posit"

    def describe(self) -> str:
        return "POSIT8"


def test_a_kind_without_emitter_is_no_kernel():
    fmt = dataclasses.replace(formats.get("mxint8"), element=PositElement())
    with pytest.raises(NoKernel, match="no Triton emitter for element kind 'posit'.*int, float, "
                                       "log, codebook"):
        emit.element(fmt.element)
    with pytest.raises(NoKernel, match="'posit'"):
        dequant_source(fmt)
    assert not select.quant_supported(fmt) and not select.fusable_act(fmt)


def test_a_hole_left_unfilled_is_an_error():
    """The skeletons render under StrictUndefined: a missing hole raises, it is never empty."""
    wfmt, af = formats.get("mxint8"), formats.get("mxint8")
    holes = {**lin._skeleton_holes(wfmt, af, "gemm", "float32", "float32", True, True, False),
             **lin._int_holes(wfmt, af, False)}
    assert "def linear_kernel(" in lin._template("linear_int.py.jinja").render(**holes)
    del holes["dot"]
    with pytest.raises(jinja2.UndefinedError, match="'dot' is undefined"):
        lin._template("linear_int.py.jinja").render(**holes)


def test_launch_tensors_follow_the_format_side_data():
    """The launcher's tensors for NVFP4 are the tensor's own side tensor (float32 [1])."""
    fmt = formats.get("nvfp4")
    side = {"tensor_scale": torch.tensor([0.25])}
    (ts,) = emit.decode_tensors(fmt, side, "cpu")
    assert ts.dtype == torch.float32 and ts.tolist() == [0.25]
    assert emit.decode_operands(fmt) == ["tensor_scale_ptr"]
