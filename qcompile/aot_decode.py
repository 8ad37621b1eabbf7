"""Decoding with packages: a prefill graph and a decode graph over an explicit static KV cache.

    qcompile.export_decoder(model, policy, "llama_pkg", max_cache_len=64)   # a folder
    dec = qcompile.load_decoder("llama_pkg")          # in any process: no torch.compile
    tokens = dec.generate(ids, max_new_tokens=8)      # greedy

Both graphs are the same wrapper, ``_CacheStep``, exported twice by ``aot.export`` (so both
packages get its checks and its record): ``(ids, position, k_0, v_0, k_1, v_1, ...)`` ->
``(logits of the last token, k_0', v_0', ...)``. The cache tensors are graph inputs and outputs
(shape ``[1, kv_heads, max_cache_len, head_dim]``, fixed), not buffers: AOTInductor would keep
mutated buffers inside one package, and the two packages must share one cache. ``position`` is
the number of tokens already in the cache. Inside the forward the tensors are put into a
transformers ``StaticCache`` (whose layers write the new keys and values with ``index_copy_``
and whose mask covers the whole fixed length), so the model's own attention code runs
unchanged. The prefill graph takes 2 to ``max_cache_len`` prompt tokens (a dynamic dimension);
the decode graph takes one token. Batch 1 only.
"""
from __future__ import annotations

import os
import uuid

import torch

from . import aot

PREFILL, DECODE = "prefill.pt2", "decode.pt2"  # the two packages in the decoder's folder
DECODER_FORMAT = 1  # the layout of the record's "decoder" entry


class _CacheStep(torch.nn.Module):
    """One forward of a causal LM over a static cache passed as tensors (see the module doc)."""

    def __init__(self, model, max_cache_len: int):
        super().__init__()
        self.model, self.max_cache_len = model, max_cache_len

    def forward(self, ids, position, *caches):
        cache = self._static_cache(position, caches)
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
        new = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (out.logits[:, -1, :], *new)

    def _static_cache(self, position, caches):
        from transformers import StaticCache
        cache = StaticCache(config=self.model.config, max_cache_len=self.max_cache_len)
        for layer, keys, values in zip(cache.layers, caches[0::2], caches[1::2]):
            # clones: the graph returns new cache tensors and leaves its inputs as they were
            layer.keys, layer.values = keys.clone(), values.clone()
            layer.cumulative_length = position.reshape(()).clone()
            layer.dtype, layer.device = keys.dtype, keys.device
            layer.is_initialized = True
        return cache


def cache_shapes(model, max_cache_len: int) -> list[list[int]]:
    """The shape of each cache tensor, keys and values of each layer in turn."""
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return [[1, kv_heads, max_cache_len, head_dim]] * (2 * cfg.num_hidden_layers)


def export_decoder(model, policy, path, *, max_cache_len: int) -> str:
    """Compile a causal LM (a transformers ``...ForCausalLM``) ahead of time into two packages
    in the folder ``path``: ``prefill.pt2`` (a prompt of 2 to ``max_cache_len`` tokens) and
    ``decode.pt2`` (one token), both over a static KV cache of ``max_cache_len`` tokens passed
    as tensors. ``policy`` as for ``qcompile.export`` (applied once, in place). Returns the
    folder. CPU, batch 1, float caches of the model's dtype."""
    _check_decoder(model, max_cache_len)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    _quantise_once(model, policy)  # here: both graphs then take the packed model as it is
    step = _CacheStep(model, max_cache_len).eval()
    dtype = getattr(model, "dtype", torch.float32)  # (transformers models have one)
    shapes = cache_shapes(model, max_cache_len)
    caches = [torch.zeros(s, dtype=dtype) for s in shapes]
    # "export": one id for the pair, so that a decode.pt2 of another export is told apart
    info = {"decoder_format": DECODER_FORMAT, "export": uuid.uuid4().hex,
            "max_cache_len": max_cache_len,
            "cache_shapes": shapes, "cache_dtype": str(dtype).removeprefix("torch.")}
    position = torch.zeros(1, dtype=torch.long)
    prompt = torch.zeros(1, min(8, max_cache_len), dtype=torch.long)
    seq = torch.export.Dim("prompt", min=2, max=max_cache_len)
    fixed = (None,) * len(caches)  # (the caches are one *args argument: a tuple)
    aot._export(step, None, (prompt, position, *caches), os.path.join(path, PREFILL),
                dynamic_shapes=({1: seq}, None, fixed), extra={"decoder": info})
    aot._export(step, None, (prompt[:, :1], position, *caches), os.path.join(path, DECODE),
                extra={"decoder": info})
    return path


def _check_decoder(model, max_cache_len):
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        raise TypeError("qcompile.export_decoder: expected a transformers causal LM (a model "
                        f"with a .config), got {type(model).__name__}; use qcompile.export for "
                        "other models")
    if not isinstance(max_cache_len, int) or max_cache_len < 3:
        raise ValueError(f"qcompile.export_decoder: max_cache_len must be an int >= 3 (the "
                         f"prompt and the new tokens together), got {max_cache_len!r}")
    _refuse_other_cache_layers(config, max_cache_len)


def _quantise_once(model, policy):
    policy = aot._export_policy(model, policy)
    if policy is not None:
        aot._refuse_unexportable_policy(model, policy)
        from .swap import quantize_model_
        quantize_model_(model, policy)


def _refuse_other_cache_layers(config, max_cache_len: int):
    """Only plain full-attention layers: a sliding-window or linear-attention layer keeps its
    cache otherwise than ``_CacheStep`` fills it."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer
    layers = StaticCache(config=config, max_cache_len=max_cache_len).layers
    other = sorted({type(layer).__name__ for layer in layers if type(layer) is not StaticLayer})
    if other:
        raise NotImplementedError(f"qcompile.export_decoder: this model's static cache has "
                                  f"{other} layers; only full-attention layers (StaticLayer) "
                                  "are exported yet: use qcompile.export without a cache")


class LoadedDecoder:
    """What ``load_decoder`` returns: the two loaded packages and a greedy ``generate``."""

    def __init__(self, prefill: aot.LoadedPackage, decode: aot.LoadedPackage, info: dict):
        self.prefill, self.decode, self.info = prefill, decode, info
        self.max_cache_len = info["max_cache_len"]

    def new_cache(self) -> list[torch.Tensor]:
        dtype = getattr(torch, self.info["cache_dtype"])
        return [torch.zeros(s, dtype=dtype) for s in self.info["cache_shapes"]]

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *,
                 return_logits: bool = False):
        """Greedy decoding: ``input_ids`` [1, prompt] (int64) followed by ``max_new_tokens``
        tokens, as ``model.generate(input_ids, do_sample=False, max_new_tokens=...)`` without
        stop tokens. ``return_logits=True``: also the list of each step's logits [1, vocab]."""
        ids = self._check_prompt(input_ids, max_new_tokens)
        cache, logits, out = self.new_cache(), [], [ids]
        step = self.prefill if ids.shape[1] >= 2 else self.decode
        position = torch.zeros(1, dtype=torch.long)
        for _ in range(max_new_tokens):
            last, *cache = step(ids, position, *cache)
            position = position + ids.shape[1]
            ids = last.argmax(-1, keepdim=True)
            logits.append(last)
            out.append(ids)
            step = self.decode
        tokens = torch.cat(out, dim=1)
        return (tokens, logits) if return_logits else tokens

    def _check_prompt(self, input_ids, max_new_tokens: int) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 \
                or input_ids.shape[0] != 1 or input_ids.dtype != torch.long:
            raise ValueError("LoadedDecoder.generate: input_ids must be an int64 tensor of shape "
                             f"[1, prompt length] (batch 1), got {_describe(input_ids)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"LoadedDecoder.generate: max_new_tokens must be an int >= 1, got "
                             f"{max_new_tokens!r}")
        total = input_ids.shape[1] + max_new_tokens - 1  # the last token is never fed back
        if input_ids.shape[1] < 1 or total > self.max_cache_len:
            raise ValueError(f"LoadedDecoder.generate: the prompt ({input_ids.shape[1]} tokens) "
                             f"and {max_new_tokens} new tokens need a cache of {total}; this "
                             f"decoder was exported with max_cache_len={self.max_cache_len}")
        return input_ids

    def __repr__(self):
        return f"LoadedDecoder(max_cache_len={self.max_cache_len}, prefill={self.prefill})"


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__


def load_decoder(path) -> LoadedDecoder:
    """Load the two packages ``export_decoder`` wrote in the folder ``path`` (each checked as
    ``qcompile.load_package`` checks it). No torch.compile, no Dynamo."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"qcompile.load_decoder: no folder {path!r} (export_decoder "
                                "writes a folder holding prefill.pt2 and decode.pt2)")
    prefill, decode = (aot.load_package(os.path.join(path, name)) for name in (PREFILL, DECODE))
    info = prefill.record.get("decoder")
    if info is None or info != decode.record.get("decoder"):
        raise aot.PackageError(f"qcompile.load_decoder: {path}'s {PREFILL} and {DECODE} were "
                               "not exported together by qcompile.export_decoder: export again")
    if info.get("decoder_format") != DECODER_FORMAT:
        raise aot.PackageError(f"qcompile.load_decoder: {path} has decoder format "
                               f"{info.get('decoder_format')!r}; this qcompile reads "
                               f"{DECODER_FORMAT}: export again")
    return LoadedDecoder(prefill, decode, info)
