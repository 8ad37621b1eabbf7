"""Proxy quantisation's column scores (Dettmers & Zettlemoyer, ICML 2023, arXiv:2212.09720).

Outlier features sit in a few hidden dimensions. Proxy quantisation finds them without data: an
input column of a layer is the output of an earlier layer, and the standard deviation of that
layer's weight row (the weights that compute the column) is the proxy for how large the column
gets. A format with the ``proxy`` option keeps the highest-scoring input columns of each weight
in bfloat16 (qcompile.formats.reference) and quantises the rest; this module computes the scores.

"The layer that computes a column", for the architectures known here (HF module names):

- Llama-style decoders (Llama, SmolLM2, Mistral, Qwen2: ``self_attn.{q,k,v,o}_proj``,
  ``mlp.{gate,up,down}_proj``): ``down_proj`` column j is ``act(gate_j x) * up_j x``, scored
  ``std(gate_j) * std(up_j)``; ``o_proj`` column j is the value projection's row of its head
  (grouped-query heads share a value head); ``q/k/v_proj``, ``gate/up_proj`` and ``lm_head``
  read the residual stream through a norm: the rows of the last layer that wrote it (the
  previous block's ``down_proj``, this block's ``o_proj``; the embedding's columns before the
  first block), times |the norm's weight| (the norm rescales column j by it).
- GPT-2 (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``; Conv1D weights are
  [in, out], so a row of the definition is a column there): ``attn.c_proj`` from the value
  third of ``c_attn``, ``mlp.c_proj`` from ``c_fc``, the rest from the residual stream as
  above (before the first block: token and position embeddings, their variances added).

Other layers have no known source: asking for one raises an error naming it.

Under tensor parallelism (a tp_plan's DTensor weights) the scores are the whole tensors' on
every rank, bit for bit: a source weight split by its output units gives each rank whole rows,
whose standard deviations are gathered; one split otherwise is gathered whole first.
"""
from __future__ import annotations

import torch

from .linear_rule import is_conv1d, linear_like

KNOWN = ("Llama-style decoders (Llama, SmolLM2, Mistral, Qwen2: self_attn.q/k/v/o_proj, "
         "mlp.gate/up/down_proj) and GPT-2 (attn.c_attn/c_proj, mlp.c_fc/c_proj)")


class _Weights:
    """Reads the full-precision weights of a model's modules (``override``: {parameter name:
    tensor} read instead of the model's own: another instance running the same graph)."""

    def __init__(self, model, override=None):
        self.model = model
        self.names = {id(m): n for n, m in model.named_modules()}
        self.override = override or {}

    def of(self, mod, whole: bool = True) -> torch.Tensor:
        """The float64 weight of ``mod``; ``whole``: a DTensor's whole tensor, else its own."""
        name = self.names.get(id(mod), type(mod).__name__)
        w = self.override.get(f"{name}.weight".lstrip("."), getattr(mod, "weight", None))
        if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point or w.is_meta:
            raise ValueError(f"proxy quantisation scores columns by the full-precision weight of "
                             f"{name!r}, which this model no longer holds ({type(mod).__name__}); "
                             "apply a policy with proxy formats to the full-precision model")
        w = w.detach().to(torch.float64)
        return _whole(w) if whole else w

    def row_std(self, mod) -> torch.Tensor:
        """The standard deviation of the weights computing each output unit of a linear layer."""
        reduced = 0 if is_conv1d(mod) else 1  # Conv1D: [in, out]
        w = self.of(mod, whole=False)
        if _split_by(w) == 1 - reduced:  # whole rows on each rank: their stds, gathered
            return _gathered(w, w.to_local().std(dim=reduced))
        return _whole(w).std(dim=reduced)

    def gain(self, norm) -> torch.Tensor | float:
        return 1.0 if getattr(norm, "weight", None) is None else self.of(norm).abs()

    def embedding_std(self) -> torch.Tensor | None:
        """Before the first block the residual stream is the input embedding (plus GPT-2's
        position embedding): each hidden column's standard deviation over the table's rows."""
        model = self.model
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if not isinstance(emb, torch.nn.Embedding):
            return None
        var = self.of(emb).var(dim=0)
        parent = next((m for m in model.modules() if any(c is emb for c in m.children())), None)
        wpe = getattr(parent, "wpe", None)  # GPT-2's position table beside its token table
        if isinstance(wpe, torch.nn.Embedding) and wpe.embedding_dim == emb.embedding_dim:
            var = var + self.of(wpe).var(dim=0)
        return var.sqrt()


def _is_dtensor(w) -> bool:
    if type(w) in (torch.Tensor, torch.nn.Parameter) or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(w, DTensor)


def _split_by(w) -> int | str | None:
    """The dimension a DTensor ``w`` (a tp_plan's weight) is cut along in torch.chunk's
    contiguous pieces, "other" for any other split, or None (a plain or replicated tensor)."""
    if not _is_dtensor(w) or all(p.is_replicate() for p in w.placements):
        return None
    from torch.distributed.tensor import Shard
    place = w.placements[0]
    return place.dim % w.dim() if len(w.placements) == 1 and type(place) is Shard else "other"


def _whole(w) -> torch.Tensor:
    """A DTensor's whole tensor, every rank's shard gathered (the one-process tensor)."""
    return w.full_tensor() if _is_dtensor(w) else w


def _gathered(w, part: torch.Tensor) -> torch.Tensor:
    """The whole vector of one value per row (along dim 0 of ``part``) of every rank's shard of
    the DTensor ``w``, split as ``w`` is along that dimension."""
    from torch.distributed.tensor import DTensor, Shard
    n = w.shape[_split_by(w)]
    return DTensor.from_local(part, w.device_mesh, [Shard(0)], run_check=False,
                              shape=torch.Size([n]), stride=(1,)).full_tensor()


def _llama_block(m) -> bool:
    attn, mlp = getattr(m, "self_attn", None), getattr(m, "mlp", None)
    return (attn is not None and mlp is not None
            and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and hasattr(m, "input_layernorm") and hasattr(m, "post_attention_layernorm")
            # Gemma-style blocks norm the MLP input with another norm (of 1 + weight): not known
            and not hasattr(m, "pre_feedforward_layernorm"))


def _gpt2_block(m) -> bool:
    attn, mlp = getattr(m, "attn", None), getattr(m, "mlp", None)
    return (attn is not None and mlp is not None and hasattr(attn, "c_attn")
            and hasattr(attn, "c_proj") and hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj")
            and hasattr(m, "ln_1") and hasattr(m, "ln_2"))


def _value_heads(v_std, attn, o_in: int) -> torch.Tensor:
    """v_proj's row scores spread over o_proj's input columns (heads sharing a value head)."""
    head_dim = getattr(attn, "head_dim", None)
    if not head_dim or v_std.numel() % head_dim or o_in % head_dim:
        raise ValueError(f"proxy quantisation: cannot map the value heads onto o_proj's {o_in} "
                         f"input columns (head_dim {head_dim!r})")
    kv, heads = v_std.numel() // head_dim, o_in // head_dim
    if heads % kv:
        raise ValueError(f"proxy quantisation: {heads} heads cannot share {kv} value heads")
    return v_std.view(kv, head_dim).repeat_interleave(heads // kv, dim=0).flatten()


def _value_third(c_attn_std) -> torch.Tensor:
    third = c_attn_std.numel() // 3
    if c_attn_std.numel() != 3 * third:
        raise ValueError("proxy quantisation: c_attn does not hold query, key and value thirds")
    return c_attn_std[2 * third:]


def _sources(model, w: _Weights) -> dict:
    """{linear name: zero-argument function giving its input columns' scores}."""
    named = list(model.named_modules())
    blocks = [(n, m) for n, m in named if _llama_block(m) or _gpt2_block(m)]
    out: dict = {}

    def residual(names, norm, writer):  # norm(residual stream): its last writer's rows, rescaled
        def score():
            base = w.row_std(writer) if writer is not None else w.embedding_std()
            if base is None:
                raise ValueError("proxy quantisation: no input embedding before the first "
                                 "block, so the first layers' columns have no source")
            return base * w.gain(norm)
        out.update(dict.fromkeys(names, score))

    writer = None  # the last linear layer that wrote the residual stream
    for b, block in blocks:
        if _llama_block(block):
            a, f = block.self_attn, block.mlp
            out[f"{b}.self_attn.o_proj"] = lambda a=a: _value_heads(
                w.row_std(a.v_proj), a, a.o_proj.in_features)
            out[f"{b}.mlp.down_proj"] = lambda f=f: w.row_std(f.gate_proj) * w.row_std(f.up_proj)
            residual([f"{b}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")],
                     block.input_layernorm, writer)
            residual([f"{b}.mlp.gate_proj", f"{b}.mlp.up_proj"], block.post_attention_layernorm,
                     a.o_proj)
            writer = f.down_proj
        else:
            a, f = block.attn, block.mlp
            out[f"{b}.attn.c_proj"] = lambda a=a: _value_third(w.row_std(a.c_attn))
            out[f"{b}.mlp.c_proj"] = lambda f=f: w.row_std(f.c_fc)
            residual([f"{b}.attn.c_attn"], block.ln_1, writer)
            residual([f"{b}.mlp.c_fc"], block.ln_2, a.c_proj)
            writer = f.c_proj
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    final = _final_norm(model, blocks)
    if blocks and linear_like(head) and final is not None:
        residual([n for n, m in named if m is head], final, writer)
    return out


def _final_norm(model, blocks):
    """The norm after the last block: the blocks' container's sibling named norm or ln_f."""
    if not blocks:
        return None
    container = blocks[-1][0].rpartition(".")[0]  # e.g. model.layers, transformer.h
    owner = model.get_submodule(container.rpartition(".")[0])
    norm = getattr(owner, "norm", None)
    return norm if norm is not None else getattr(owner, "ln_f", None)


def input_scores(model: torch.nn.Module, names, weights=None) -> dict[str, torch.Tensor]:
    """{name: float32 scores, one per input column} for the linear layers ``names`` of
    ``model`` (names as ``model.named_modules()`` gives them), from their source layers'
    full-precision weights (``weights``: {parameter name: tensor} to read instead of the
    model's own). Raises ValueError naming a layer whose source is not known."""
    names = list(dict.fromkeys(names))
    if not names:
        return {}
    sources = _sources(model, _Weights(model, weights))
    unknown = [n for n in names if n not in sources]
    if unknown:
        raise ValueError(f"proxy quantisation keeps the input columns whose source layer's "
                         f"weight rows vary most, but blockquant does not know which layer feeds "
                         f"{', '.join(map(repr, unknown[:5]))}"
                         f"{' and others' if len(unknown) > 5 else ''} in this "
                         f"{type(model).__name__}; it knows {KNOWN}. Give these layers a format "
                         "without the proxy option, or pass proxy_score= to qcompile.quantize")
    modules = dict(model.named_modules())
    scores = {}
    for n in names:
        s = sources[n]().to(torch.float32)
        mod = modules[n]
        k = mod.in_features if isinstance(mod, torch.nn.Linear) else mod.weight.shape[0]
        if s.numel() != k:
            raise ValueError(f"proxy quantisation: {n!r} has {k} input columns but its source "
                             f"gives {s.numel()} scores")
        scores[n] = s
    return scores
