"""blockquant: block-quantised number formats and a torch.compile backend."""
from . import formats
from .api import dequantize, fake_quantize, quantize
from .formats import Format
from .formats.qtensor import QTensor
from .policy import LayerSpec, Policy
from .swap import fake_quantize_model_, quantize_model_, resident_weight_bytes
from .backend import compile
from .explain import explain
from .search import search_policy
from .serialize import load_quantized, save_quantized
from .integrations import hf_hook

hf_hook.install()  # registers BlockQuantConfig once transformers' quantizer registry loads


def __getattr__(name):  # the transformers integration imports transformers: only when used
    if name in ("BlockQuantConfig", "BlockQuantHfQuantizer"):
        from .integrations import hf
        return getattr(hf, name)
    if name in ("export", "load_package"):  # torch.export and AOTInductor: only when used
        from . import aot  # (not qcompile/export.py: importing it would shadow this function)
        return getattr(aot, name)
    if name in ("export_decoder", "load_decoder"):
        from . import aot_decode
        return getattr(aot_decode, name)
    if name == "quantize_checkpoint":
        from .integrations.stream import quantize_checkpoint
        return quantize_checkpoint
    raise AttributeError(f"module 'qcompile' has no attribute {name!r}")

__all__ = ["formats", "Format", "QTensor", "quantize", "dequantize", "fake_quantize", "Policy",
           "LayerSpec", "compile", "explain", "quantize_model_", "resident_weight_bytes",
           "fake_quantize_model_", "save_quantized", "load_quantized", "search_policy"]
__version__ = "0.1.0"
