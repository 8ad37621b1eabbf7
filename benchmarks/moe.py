"""A mixture-of-experts model on a CPU, compiled and eager side by side, in one process
(``python -m benchmarks run --sections moe``; issue 23).

The model: transformers' Qwen3-MoE with a real MoE's layer shapes (those of Qwen3-30B-A3B:
hidden 2048, 8 of 64 or 128 experts active per token, expert width 768, attention with 32 query
heads and 4 key/value heads of 128), two decoder layers and a vocabulary of 4096 tokens (so the
experts, not the embedding and lm_head, hold most of the weights), from a seeded random
initialisation (transformers' own, std 0.02): nothing is downloaded.

Rows, per model dtype (fp32, bf16), each timed as benchmarks/speed.py times its rows (a warm-up
round that compiles, then medians over ``repeats`` rounds of a long prefill and of decode
steps with the KV cache after a short prompt):

* eager <dtype>: the model as built (eager fp32 is the baseline of every ratio);
* torch.compile <dtype>: ``torch.compile(model)`` (Inductor, or Dynamo with the eager backend);
* blockquant <policy> <dtype> (packed, eager): ``qcompile.quantize_model_(model, policy)`` run
  as it is: linears, embedding and expert tensors packed, each expert decoded when used;
* blockquant <policy> <dtype> (<lowering>): that same model, ``qcompile.compile(model, policy,
  lowering=...)`` in place.

Policies: ``nf4`` (weight-only) and ``W4A8`` (int4 weights, int8 activations), both on every
linear layer, lm_head included, and the embedding table (``policies.every_linear``); the default
rule covers the expert tensors. Expert tensors take no activation format (quantize_model_ says
so, and each row notes it): under W4A8 only the attention projections and lm_head quantise
their inputs.

Per row, beside the times: the resident weight bytes (``qcompile.resident_weight_bytes``)
against the fp32 model's, and, over the decode steps of one more (untimed) run, the bytes of the
experts the routers chose per decoded token (per step and layer: the distinct experts chosen,
times each one's bytes as held: packed codes, scales and side data, or the float tensors) and
the packed bytes the experts counted reading (``PackedExperts.bytes_read``, where the installed
qcompile has that counter; "n/a" otherwise).
"""
from __future__ import annotations

import copy

import torch
from tqdm import tqdm

import qcompile

from .policies import every_linear
from .speed import _one, generate_timed

#: Qwen3-30B-A3B's layer shapes (its config.json)
SHAPE = dict(hidden_size=2048, num_experts_per_tok=8, moe_intermediate_size=768,
             num_attention_heads=32, num_key_value_heads=4, head_dim=128)
LAYERS, VOCAB = 2, 4096
EXPERTS, QUICK_EXPERTS = 64, 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: policy name -> (weight format, activation format)
POLICIES = {"nf4": ("nf4", None), "W4A8": ("int4", "int8")}
TITLE = "Qwen3-MoE, 2 layers, Qwen3-30B-A3B layer shapes, random weights"


def moe_config(experts: int = EXPERTS, layers: int = LAYERS, vocab: int = VOCAB, **shape):
    """A Qwen3-MoE config with ``SHAPE`` (overridden by ``shape``), every layer sparse."""
    import transformers
    shape = {**SHAPE, **shape}
    if not 1 <= shape["num_experts_per_tok"] <= experts:
        raise ValueError(f"{experts} experts cannot have {shape['num_experts_per_tok']} active "
                         "per token: give at least as many experts as active ones")
    return transformers.Qwen3MoeConfig(vocab_size=vocab, num_hidden_layers=layers,
                                       num_experts=experts, decoder_sparse_step=1,
                                       mlp_only_layers=[], **shape)


def describe(config) -> dict:
    """The settings the report names."""
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "experts": config.num_experts, "active": config.num_experts_per_tok,
            "expert_width": config.moe_intermediate_size, "vocab": config.vocab_size,
            "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "head_dim": config.head_dim}


def build_model(config, seed: int = 0) -> torch.nn.Module:
    """The float32 model of ``config``, initialised by transformers from ``seed``."""
    import transformers
    torch.manual_seed(seed)
    return transformers.Qwen3MoeForCausalLM(config).eval()


# -- which experts the routers chose, and what they weigh --------------------------------------

def moe_blocks(model) -> list[torch.nn.Module]:
    """The sparse blocks: modules with a router ``gate`` and an ``experts`` module."""
    blocks = [m for m in model.modules() if isinstance(getattr(m, "gate", None), torch.nn.Module)
              and isinstance(getattr(m, "experts", None), torch.nn.Module)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no mixture-of-experts block (a module "
                         "with a 'gate' router and an 'experts' module)")
    return blocks


def expert_bytes(experts: torch.nn.Module) -> list[int]:
    """Bytes of each expert's tensors as ``experts`` holds them: packed (codes, scales, side
    data of ``PackedExperts``) or float 3-D parameters [E, a, b]."""
    sizes = [0] * experts.num_experts
    for held in experts.children():
        if getattr(held, "quantised_experts", False):
            for e in range(held.num_experts):
                q = held.expert_qtensor(e)
                sizes[e] += sum(t.numel() * t.element_size()
                                for t in (q.codes, q.scales, *q.side.values()))
    for p in experts._parameters.values():
        if p is not None and p.dim() == 3:
            for e in range(p.shape[0]):
                sizes[e] += p[e].numel() * p.element_size()
    return sizes


def _top_k_ids(out) -> torch.Tensor:
    """The expert ids of a router's output: Qwen3-MoE's returns (logits, weights, ids)."""
    ids = out[-1] if isinstance(out, tuple) else None
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
        raise TypeError("the router did not return its top-k expert ids last (got "
                        f"{type(out).__name__}); this benchmark reads Qwen3-MoE's routers")
    return ids.detach().cpu()


class RouterLog:
    """The top-k expert ids each block's router chose, one entry per call, while entered
    (a forward hook on each router)."""

    def __init__(self, blocks):
        self.blocks, self.calls, self.handles = blocks, [[] for _ in blocks], []

    def __enter__(self):
        for block, calls in zip(self.blocks, self.calls):
            self.handles.append(block.gate.register_forward_hook(
                lambda _m, _a, out, calls=calls: calls.append(_top_k_ids(out))))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def clear(self):
        for calls in self.calls:
            calls.clear()

    def active_bytes(self) -> int:
        """Sum over calls of the distinct experts chosen, each at its bytes as held."""
        total = 0
        for block, calls in zip(self.blocks, self.calls):
            sizes = expert_bytes(block.experts)
            total += sum(sizes[e] for ids in calls for e in ids.unique().tolist())
        return total


def _packs(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if getattr(m, "quantised_experts", False)]


COUNTER = "bytes_read"  # PackedExperts' count of the packed bytes its kernels and decodes read


def _bytes_read(packs) -> int | None:
    """The packed experts' read counters summed (each ``PackedExperts`` counts its own), or
    None where the installed qcompile has no such counter."""
    counts = [getattr(p, COUNTER, None) for p in packs]
    if not counts or any(not isinstance(c, int) for c in counts):
        return None
    return sum(counts)


@torch.no_grad()
def decode_bytes(fn, held, prompt: torch.Tensor, decode: int) -> dict:
    """Per decoded token (``decode`` steps after ``prompt``): the active experts' bytes and the
    bytes the packed experts counted reading (None: no counter, or no packed experts).

    The routers' choices come from a run with compilation off: a compiled graph does not run
    hooks added after it was traced. For one token per step the count does not depend on
    which experts were chosen (top-k ids are distinct, and every expert is the same size)."""
    log = RouterLog(moe_blocks(held))
    with log, torch.compiler.set_stance("force_eager"):
        generate_timed(fn, prompt, decode, after_prefill=log.clear)
    packs, marks = _packs(held), []
    read = None
    if _bytes_read(packs) is not None:  # the counter, on the row's own (compiled) path
        generate_timed(fn, prompt, decode, after_prefill=lambda: marks.append(_bytes_read(packs)))
        read = (_bytes_read(packs) - marks[0]) / decode
    return {"active_expert_bytes": log.active_bytes() / decode, "expert_bytes_read": read}


# -- the rows ----------------------------------------------------------------------------------

def configurations(base, dtype: str, lowering: str):
    """(label, kind, builder) for the rows of ``base`` (the model in ``dtype``); a builder
    returns (callable, model it runs). A policy's compiled row compiles the model its packed
    row quantised (quantising the experts takes minutes), or quantises one if that row failed."""
    tag = "Inductor" if lowering == "inductor" else "Dynamo, eager lowering"
    rows = [(f"eager {dtype}", "eager", lambda: (base, base)),
            (f"torch.compile {dtype} ({tag})", "compiled",
             lambda: (torch.compile(base, backend="inductor" if lowering == "inductor"
                                    else "eager"), base))]
    for name, (weight, act) in POLICIES.items():
        policy, packed = every_linear(weight, act), []

        def quantised(policy=policy, packed=packed):
            packed.append(qcompile.quantize_model_(copy.deepcopy(base), policy))
            return packed[-1], packed[-1]

        def compiled(policy=policy, packed=packed):
            m = packed.pop() if packed else quantised()[0]
            packed.clear()
            return qcompile.compile(m, policy, lowering=lowering), m

        rows += [(f"blockquant {name} {dtype} (packed, eager)", "eager", quantised),
                 (f"blockquant {name} {dtype} ({lowering})", "compiled", compiled)]
    return rows


def measure(config, dtypes=("fp32", "bf16"), prefill: int = 512, decode_prompt: int = 128,
            decode: int = 16, repeats: int = 5, lowering: str = "inductor", seed: int = 0,
            kinds=("eager", "compiled"), on_row=None) -> list[dict]:
    """Rows of the configurations of ``kinds`` for each dtype in ``dtypes`` (eager fp32 always,
    first): a prompt of ``prefill`` random token ids times the prefill, one of
    ``decode_prompt`` starts the decoding. ``on_row(rows)``: called after each row (to save
    what a long run has measured so far)."""
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"unknown dtype(s) {unknown}; choose from {', '.join(DTYPES)}")
    if lowering not in ("eager", "inductor"):
        raise ValueError(f"unknown lowering {lowering!r}; choose eager or inductor")
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, config.vocab_size, (1, prefill), generator=gen)
    decode_prompt = torch.randint(0, config.vocab_size, (1, decode_prompt), generator=gen)
    model = build_model(config, seed)
    fp32_bytes = qcompile.resident_weight_bytes(model)
    rows = []
    for dtype in ["fp32"] + [d for d in dict.fromkeys(dtypes) if d != "fp32"]:
        base = model.to(DTYPES[dtype])  # in place: one float copy of the weights at a time
        configs = [c for c in configurations(base, dtype, lowering) if c[1] in kinds]
        if dtype == "fp32" and "fp32" not in dtypes:
            configs = configs[:1]  # the baseline alone
        for label, kind, build in tqdm(configs, desc=f"moe {dtype}", unit="config"):
            rows.append(_row(label, kind, build, (prompt, decode_prompt), decode, repeats,
                             fp32_bytes))
            if on_row is not None:
                on_row(rows)
    torch._dynamo.reset()
    return rows


def _row(label, kind, build, prompts, decode, repeats, fp32_bytes) -> dict:
    """speed.py's timing of one configuration, then its bytes per decoded token; a failing
    configuration gives an error row and the others still run."""
    torch._dynamo.reset()
    built = []

    def keep():  # speed._one builds the configuration; the byte count needs what it built
        built.append(build())
        return built[-1]

    try:
        row = _one(label, kind, keep, prompts, decode, repeats, fp32_bytes)
        fn, held = built[-1]
        row.update(decode_bytes(fn, held, prompts[1], decode))
        notes = sorted({p.act_note for p in _packs(held) if p.act_note})
        row["experts_note"] = "; ".join(notes)
        return row
    except Exception as e:  # one failing configuration must not lose the others
        tqdm.write(f"  {label:<40} FAILED: {type(e).__name__}: {str(e)[:300]}")
        return {"label": label, "kind": kind, "error": f"{type(e).__name__}: {e}"}
