"""Policies applied to a model's modules, without compiling: ``quantize_model_`` (linear layers
swapped for ``QuantLinear`` and embeddings for ``QuantEmbedding``, which hold only the packed
weight) and ``fake_quantize_model_`` (the eager model a compiled one is checked against).

``linear_layers`` and ``embedding_layers`` decide for every entry point (these two, the
transformers loader, the streaming command, the search) which layers a policy quantises, with
the same rules as the backend:
- linear layers are nn.Linear (weight [N, K], blocks along axis 1) and GPT-2's Conv1D
  (weight [K, N], blocks along axis 0); the first matching rule wins; a module that only looks
  like one (an MoE router holding a 2-D weight) stays in full precision (qcompile.linear_rule);
- embeddings (nn.Embedding [vocab, hidden], blocks along axis 1) only by a rule whose spec has
  ``op="embedding"``;
- a weight shared between modules (a tied embedding / lm_head) is quantised for each holder the
  policy quantises, and one packed tensor serves the holders given the same format (the backend
  does the same); a holder the policy keeps in full precision keeps the original tensor;
- a layer whose parent reads its ``.weight`` directly instead of calling it
  (``nn.MultiheadAttention``'s ``out_proj``) cannot be swapped or quantised by the backend: it
  is skipped with a warning (one per reason), and ``explain`` shows why;
- a policy rule that matches no layer of the model is said once per entry point;
- mixture-of-experts tensors (3-D parameters, one matrix per expert: qcompile.experts) are
  layers named after the parameter (``expert_layers``): ``fake_quantize_model_`` quantises
  each expert's matrix along its reduction axis, ``quantize_model_`` packs all experts of a
  tensor into one ``PackedExperts`` that the experts module's forward decodes per expert
  (qcompile.expert_stack).
"""
from __future__ import annotations

import json

import torch

from . import api, config, experts, tensor_parallel
from .expert_stack import install as install_experts
from .expert_stack import PackedExperts, pack_experts
from .ops import qtensor_from, qtensor_meta
from .linear_rule import is_conv1d, linear_like, linear_lookalike, skip_reason
from .passes.find import MAX_NORM_REASON
from .passes.plan import warn_skipped, warn_unmatched
from .policy import Policy, PolicyError, default_policy
from .proxy import input_scores

SKIP_REASON_ATTR = "_qcompile_skipped"
SKIPPED_EXPERTS_ATTR = experts.SKIPPED_EXPERTS_ATTR  # {parameter attribute: reason} on a module
PROXY_EXPERTS_REASON = ("proxy quantisation keeps the weight columns that the previous layer's "
                        "weights score highest, and an expert tensor's inputs come from a router, "
                        "not from one previous layer: give expert tensors a format without the "
                        "proxy option")
POLICIES_ATTR = "_qcompile_policies"  # the policies quantize_model_ applied, in order (saved)


def _check_policy(policy, who: str) -> Policy:
    policy = default_policy() if policy is None else policy
    if not isinstance(policy, Policy):
        raise PolicyError(f"{who}: policy must be a qcompile.Policy, got {type(policy).__name__}")
    return policy


def linear_layers(model: torch.nn.Module, policy: Policy, who: str) -> list[tuple]:
    """``(name, module, spec, axis, tied)`` for every linear layer the policy gives a spec;
    ``tied``: its weight is shared with another module. Every entry point decides its layers
    here, by the backend's rule (qcompile.linear_rule): layers the policy gives a format that
    cannot take it (``skip_reason``: look-alikes such as MoE routers, a parent reading
    ``.weight``) are marked for explain and said once per reason, and so is every policy rule
    that matches no layer of the model."""
    warn_unmatched(policy, model, who)
    holders = _holder_counts(model)
    parents = {f"{pn}.{cn}" if pn else cn: pm for pn, pm in model.named_modules()
               for cn, _ in pm.named_children()}
    layers, skipped = [], []
    for name, mod in list(model.named_modules()):
        if not (linear_like(mod) or linear_lookalike(mod)):
            continue
        rule, spec = policy.match(name, "linear")
        if spec is None:
            continue
        reason = skip_reason(mod, parents.get(name))
        if reason is not None:
            setattr(mod, SKIP_REASON_ATTR, reason)
            skipped.append((name, reason))
            continue
        layers.append((name, mod, spec, 0 if is_conv1d(mod) else 1,
                       holders.get(id(mod.weight), 1) > 1))
    warn_skipped(who, skipped, id(model))
    return layers


def expert_layers(model: torch.nn.Module, policy: Policy, who: str,
                  meta_stand_ins: bool = False) -> list[tuple]:
    """``(ExpertTensor, spec)`` for every mixture-of-experts tensor (qcompile.experts) the
    policy gives a weight format, matched by the parameter's name. Tensors that cannot take it
    (a layout the probe does not recognise, a proxy format) are marked for explain and said
    once per reason; an activation format, which expert tensors do not take yet, is said once
    and the weight is quantised alone. Call it before changing the model: it runs each experts
    module's forward once on a probe input (``meta_stand_ins``: see experts.expert_tensors)."""
    warn_unread_matrices(model, policy, who)
    wanted = {}
    for name, _, _ in experts.candidates(model):
        rule, spec = policy.match(name, "linear")
        if spec is not None and spec.weight is not None:
            wanted[name] = spec
    if not wanted:
        return []
    found, unrecognised = experts.expert_tensors(model, set(wanted), meta_stand_ins)
    skipped, layers = list(unrecognised.items()), []
    for t in found:
        spec = wanted[t.name]
        if spec.weight.proxy is not None:
            skipped.append((t.name, PROXY_EXPERTS_REASON))
        else:
            layers.append((t, spec))
    by_name = {name: (mod, attr) for name, mod, attr in experts.candidates(model)}
    for name, reason in skipped:
        mod, attr = by_name[name]
        mod.__dict__.setdefault(SKIPPED_EXPERTS_ATTR, {})[attr] = reason
    warn_skipped(who, skipped, id(model))
    acted = [t.name for t, spec in layers if spec.act is not None]
    if acted:
        config.warn(f"{who}: the policy gives expert tensor(s) {', '.join(map(repr, acted[:3]))}"
                    f"{' and more' if len(acted) > 3 else ''} an activation format, which "
                    "expert tensors do not take yet: their weights are quantised, their inputs "
                    "stay in full precision (explain notes it)", once=(who, "expert act",
                                                                      id(model)))
    return layers


# the share of a model's weights that matrices no layer reads must hold to be said: below it they
# are a model's odd tables (explain lists every one); above it, most likely experts blockquant
# does not recognise
UNREAD_SHARE = 0.1


def unread_matrices(model: torch.nn.Module, policy: Policy) -> list[tuple[str, int]]:
    """``(name, numel)`` of the 2-d parameters the policy gives a weight format that no linear
    layer, embedding, convolution or expert tensor holds (e.g. DBRX's experts: [E * I, H]
    matrices that their parent's forward reshapes), so they stay in full precision."""
    owners = {id(m) for _, m, _ in experts.candidates(model)}  # their 2-d parameters: biases
    out, seen = [], set()
    for mname, mod in model.named_modules():
        if linear_like(mod) or linear_lookalike(mod) or id(mod) in owners or isinstance(
                mod, (torch.nn.Embedding, torch.nn.EmbeddingBag, experts.CONVS)):
            seen.update(id(p) for p in mod._parameters.values() if p is not None)
            continue
        for attr, p in mod._parameters.items():
            if p is None or id(p) in seen or p.dim() != 2 or not p.dtype.is_floating_point:
                continue
            seen.add(id(p))
            name = f"{mname}.{attr}" if mname else attr
            spec = policy.match(name, "linear")[1]
            if spec is not None and spec.weight is not None:
                out.append((name, p.numel()))
    return out


def warn_unread_matrices(model: torch.nn.Module, policy: Policy, who: str) -> None:
    """Say once, by name, the matrices of ``unread_matrices`` where they hold at least
    UNREAD_SHARE of the model's weights: never silently float."""
    unread = unread_matrices(model, policy)
    total = sum(p.numel() for p in model.parameters())
    held = sum(n for _, n in unread)
    if not unread or held < UNREAD_SHARE * total:
        return
    names = ", ".join(repr(n) for n, _ in unread[:3]) + (" ..." if len(unread) > 3 else "")
    config.warn(f"{who}: {held} weights ({held / total:.0%} of the model's) in {len(unread)} "
                f"matrices stay in full precision although the policy gives them a format: no "
                f"linear layer, embedding or expert tensor reads them as its weight ({names}). "
                "Experts stored as 2-d matrices that the parent's forward reshapes (as DBRX's) "
                "are a layout blockquant does not recognise yet; explain() lists these matrices",
                once=(who, "unread matrices", id(model)))


def embedding_layers(model: torch.nn.Module, policy: Policy, who: str):
    """Yield ``(name, module, spec, tied)`` for every nn.Embedding a policy rule gives a spec
    with ``op="embedding"``; ``tied``: its table is shared with another module. An embedding
    with ``max_norm`` (which renormalises its table in place) is skipped and said once."""
    holders = _holder_counts(model)
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, torch.nn.Embedding):
            continue
        rule, spec = policy.match(name, "embedding")
        if spec is None:
            continue
        reason = MAX_NORM_REASON if mod.max_norm is not None else None
        if reason is None and not mod.weight.dtype.is_floating_point:
            reason = f"its weight is {mod.weight.dtype}, not a float tensor"
        if reason is not None:
            setattr(mod, SKIP_REASON_ATTR, reason)
            warn_skipped(who, [(name, reason)], id(model))
            continue
        yield name, mod, spec, holders.get(id(mod.weight), 1) > 1


def proxy_scores(model, layers) -> dict[str, torch.Tensor]:
    """Proxy quantisation's column scores for the layers (``linear_layers`` tuples) whose weight
    format has the proxy option, computed before any weight changes (qcompile.proxy)."""
    return input_scores(model, [name for name, _, spec, *_ in layers
                                if spec.weight is not None and spec.weight.proxy is not None])


def _holder_counts(model) -> dict[int, int]:
    holders: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        holders[id(p)] = holders.get(id(p), 0) + 1
    return holders


class _Packed(torch.nn.Module):
    """A module holding one packed QTensor as buffers (codes, scales, side data)."""

    def __init__(self, q, impl: str):
        super().__init__()
        self.register_buffer("codes", q.codes)
        self.register_buffer("scales", q.scales)
        self.side_names = list(q.side)
        for k, t in q.side.items():
            self.register_buffer(f"side_{k}", t)
        self.meta = qtensor_meta(q)
        self.impl = impl
        self.fmt_key = q.fmt.key
        # for code that reads layer.weight.dtype or .shape (T5's feed-forward, many transformers
        # models): the original weight's, on the meta device, for its values live packed
        self.weight = torch.empty(q.shape, dtype=q.dtype, device="meta")
        self.rule = ""  # the policy rule that gave this layer its format (quantize_model_)
        self.tied_with: tuple = ()  # the other modules that held the same weight

    @property
    def weight_shape(self) -> tuple:
        return tuple(json.loads(self.meta)["shape"])

    def side(self) -> list:
        return [getattr(self, f"side_{k}") for k in self.side_names]

    def qtensor(self):
        return qtensor_from(self.codes, self.scales, self.side(), self.meta)


class QuantLinear(_Packed):
    """A linear layer (nn.Linear [N, K] or GPT-2 Conv1D [K, N]) whose weight is held only as a
    packed QTensor (buffers) and which runs ``qcompile::linear``; made by ``quantize_model_``."""

    quantised_linear = True  # the backend's passes recognise swapped layers by this mark

    def __init__(self, q, bias, act, conv1d: bool, impl: str = "auto"):
        super().__init__(q, impl)
        self.bias = bias
        self.act = act.key if act is not None else ""
        self.conv1d = conv1d

    def forward(self, x):
        return torch.ops.qcompile.linear(x, self.codes, self.scales, self.side(), self.meta,
                                         self.act, self.bias, self.impl)

    def extra_repr(self):
        return f"weight={self.fmt_key}, act={self.act or '-'}, conv1d={self.conv1d}"


class QuantEmbedding(_Packed):
    """An nn.Embedding whose table [vocab, hidden] is held only as a packed QTensor (blocks
    along the hidden axis); ``qcompile::embedding`` decodes the rows it gathers. Made by
    ``quantize_model_``; shares its buffers with a tied lm_head given the same format."""

    quantised_embedding = True

    def __init__(self, q, padding_idx=None, impl: str = "auto"):
        super().__init__(q, impl)
        self.num_embeddings, self.embedding_dim = q.shape
        self.padding_idx = padding_idx

    def forward(self, ids):
        return torch.ops.qcompile.embedding(ids, self.codes, self.scales, self.side(),
                                            self.meta, self.impl)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, weight={self.fmt_key}"


def _set_child(model, name: str, new: torch.nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def matched_rule(policy: Policy, name: str, kind: str) -> str | None:
    """The rule of ``policy`` that gives layer ``name`` (op ``kind``) a weight format, as
    explain shows it ("default" for the policy's default), or None if none does."""
    rule, spec = policy.match(name, kind)
    if spec is None or spec.weight is None:
        return None
    return rule.describe() if rule is not None else "default"


def _tied_holders(model) -> list[tuple[str, ...]]:
    """The names of the modules sharing each weight held by more than one module."""
    holders: dict[int, list[str]] = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.nn.Parameter):
            holders.setdefault(id(w), []).append(name)
    return [tuple(names) for names in holders.values() if len(names) > 1]


def _warn_untied_growth(model, tied: list[tuple[str, ...]], before: int):
    """Say once when quantize_model_ gave the holders of a tied weight different formats (so
    each keeps its own copy) and the model's resident bytes grew."""
    after = resident_weight_bytes(model)
    if after <= before:
        return
    for names in tied:
        given = {n: getattr(model.get_submodule(n), "fmt_key", "full precision") for n in names}
        if len(set(given.values())) < 2:
            continue
        pair = " and ".join(repr(n) for n in names)
        config.warn(
            f"quantize_model_: {pair} shared one weight (tied), and the policy gives them "
            f"different formats ({', '.join(f'{n}: {f}' for n, f in given.items())}), so the "
            f"model now holds a copy for each: its parameters and buffers grew from {before} "
            f"to {after} bytes. Give every holder one format (for an embedding, a rule with "
            "op='embedding' and the same format for lm_head: they share one packed table), or "
            "keep all of them in full precision", once=("untied growth", id(model), names))


def quantize_model_(model: torch.nn.Module, policy: Policy | None = None) -> torch.nn.Module:
    """Swap, in place, every linear layer (nn.Linear, GPT-2 Conv1D) that ``policy`` gives a
    weight format for a ``QuantLinear`` holding only the packed weight, so the process keeps no
    full-precision copy of it. Returns the model. Compile it afterwards as usual (the backend
    finds the qcompile ops already in place) or run it eagerly. A tied weight stays in place
    for its other holders (the embedding) and the linear layer gets its packed copy. The
    swapped layers are frozen: the model is for inference. Embeddings that a rule gives
    ``LayerSpec(weight=..., op="embedding")`` become ``QuantEmbedding``; a tied embedding and
    lm_head given the same format share one packed table; given different formats (or one kept
    in full precision) each keeps its own copy, said once when the model grows. Each swapped
    layer remembers the rule that matched it (``.rule``, shown by ``explain``). Each
    mixture-of-experts tensor the policy gives a format becomes a ``PackedExperts`` holding all
    of its experts packed (qcompile.expert_stack); biases stay as they are."""
    policy = _check_policy(policy, "quantize_model_")
    swaps, packed = [], {}

    def quantise(w, fmt, axis, score=None):  # one packed tensor per (weight, format, axis)
        key = (id(w), fmt.key, axis)
        if key not in packed:  # under tensor parallelism: this rank's shard
            with torch.no_grad():
                packed[key] = tensor_parallel.quantize_weight(w, fmt, axis, score)
        return packed[key]

    layers = list(linear_layers(model, policy, "quantize_model_"))
    embeddings = list(embedding_layers(model, policy, "quantize_model_"))
    tensor_parallel.check_layers(model, [
        *((n, m.weight, s, a, "linear") for n, m, s, a, _ in layers if s.weight),
        *((n, m.weight, s, 1, "embedding") for n, m, s, _ in embeddings)])
    tensor_parallel.refuse_sharded_experts(model, policy)
    expert_tensors = expert_layers(model, policy, "quantize_model_")  # probes: model unchanged
    tied, before = _tied_holders(model), resident_weight_bytes(model)
    scores = proxy_scores(model, layers)
    for name, mod, spec, axis, _ in layers:
        if spec.weight is None:
            continue  # act-only: the backend quantises the activations when compiled
        q = quantise(mod.weight, spec.weight, axis, scores.get(name))
        swaps.append((name, "linear", QuantLinear(q, mod.bias, spec.act, axis == 0)))
    for name, mod, spec, _ in embeddings:
        swaps.append((name, "embedding", QuantEmbedding(quantise(mod.weight, spec.weight, 1),
                                                        mod.padding_idx)))
    for name, kind, new in swaps:
        new.rule = matched_rule(policy, name, kind) or ""
        new.tied_with = next((tuple(n for n in t if n != name) for t in tied if name in t), ())
        if kind == "linear":
            tensor_parallel.keep_style(model, name, model.get_submodule(name), new)
        _set_child(model, name, new)
    install_packed_experts(policy, expert_tensors)
    _warn_untied_growth(model, tied, before)
    setattr(model, POLICIES_ATTR, (*getattr(model, POLICIES_ATTR, ()), policy))
    return model


def install_packed_experts(policy: Policy, expert_tensors: list[tuple], impl: str = "auto"):
    """Pack each expert tensor of ``expert_tensors`` (``expert_layers``' answer) into a
    ``PackedExperts`` running ``impl``'s kernels and put it in the parameter's place
    (qcompile.expert_stack)."""
    for t, spec in expert_tensors:
        packed = pack_expert_tensor(t.tensor, t, spec, policy)
        packed.impl = impl
        install_experts(t.module, t.attr, packed)


def quantize_experts_(model: torch.nn.Module, policy: Policy, who: str,
                      impl: str = "auto") -> int:
    """Pack, in place, every mixture-of-experts tensor ``policy`` gives a weight format, by
    ``quantize_model_``'s rule and with its packed result (``qcompile.compile`` calls it: a
    compiled graph cannot pack them), its matmuls on ``impl``'s kernels. Returns how many were
    packed."""
    expert_tensors = expert_layers(model, policy, who)
    install_packed_experts(policy, expert_tensors, impl)
    return len(expert_tensors)


def pack_expert_tensor(w: torch.Tensor, t, spec, policy: Policy) -> PackedExperts:
    """The ``PackedExperts`` of the expert tensor ``t`` (values ``w`` [E, a, b]) in ``spec``'s
    weight format, marked with the rule that gave it and the activation format it does not
    apply."""
    return mark_expert_stack(pack_experts(w, spec.weight, t.axis), t, spec, policy)


def mark_expert_stack(packed: PackedExperts, t, spec, policy: Policy) -> PackedExperts:
    """``packed`` (the expert tensor ``t``) marked as quantize_model_ marks it."""
    packed.rule = matched_rule(policy, t.name, "linear") or ""
    if spec.act is not None:
        packed.act_note = f"act {spec.act.key} not applied: expert inputs stay full precision"
    return packed


class _FakeQuantize(torch.nn.Module):
    """A parametrization: the weight, fake-quantised (for weights computed by another one)."""

    def __init__(self, fmt, axis: int, proxy_score=None):
        super().__init__()
        self.fmt, self.axis, self.proxy_score = fmt, axis, proxy_score

    def forward(self, w):
        return api.fake_quantize(w, self.fmt, axis=self.axis, proxy_score=self.proxy_score)


def _act_hook(fmt):
    def hook(module, args):
        return (api.fake_quantize(args[0], fmt, axis=-1), *args[1:])
    return hook


def fake_quantize_model_(model: torch.nn.Module, policy: Policy | None = None) -> torch.nn.Module:
    """Fake-quantise, in place, the weights (and, by hooks, the inputs) of every linear layer
    and embedding table ``policy`` (None: the backend default) quantises: the eager model that
    a compiled model with ``lowering="eager"`` equals bit for bit. A tied weight is untied
    first: each quantised holder gets its own fake-quantised copy, the others keep the original.
    A mixture-of-experts tensor gets each expert's matrix fake-quantised along its reduction
    axis, in place. Returns the model."""
    from torch.nn.utils import parametrize
    policy = _check_policy(policy, "fake_quantize_model_")
    expert_tensors = expert_layers(model, policy, "fake_quantize_model_")  # before any change
    layers = list(linear_layers(model, policy, "fake_quantize_model_"))
    scores = proxy_scores(model, layers)  # from the weights before any is changed
    for name, mod, spec, axis, tied in layers:
        if spec.weight is not None:
            if parametrize.is_parametrized(mod, "weight"):  # e.g. weight_norm: stays computed
                parametrize.register_parametrization(
                    mod, "weight", _FakeQuantize(spec.weight, axis, scores.get(name)))
            else:
                w = mod.weight
                with torch.no_grad():
                    fq = api.fake_quantize(w.detach(), spec.weight, axis=axis,
                                           proxy_score=scores.get(name))
                if tied:
                    mod.weight = torch.nn.Parameter(fq, requires_grad=w.requires_grad)
                else:
                    w.data = fq
        if spec.act is not None:
            mod.register_forward_pre_hook(_act_hook(spec.act))
    for name, mod, spec, tied in embedding_layers(model, policy, "fake_quantize_model_"):
        w = mod.weight
        with torch.no_grad():
            fq = api.fake_quantize(w.detach(), spec.weight, axis=1)
        if tied:
            mod.weight = torch.nn.Parameter(fq, requires_grad=w.requires_grad)
        else:
            w.data = fq
    for t, spec in expert_tensors:
        _fake_quantize_experts(t.tensor, spec.weight, t.axis)
    return model


def _fake_quantize_experts(w: torch.Tensor, fmt, axis: int):
    """Each expert's matrix of ``w`` [E, a, b] fake-quantised along ``axis``, in place, one
    expert at a time."""
    with torch.no_grad():
        for e in range(w.shape[0]):
            w.data[e] = api.fake_quantize(w.data[e], fmt, axis=axis - 1)


def skipped_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str]]:
    """The layers quantize_model_ / fake_quantize_model_ skipped, with the reason."""
    return [(n, m, getattr(m, SKIP_REASON_ATTR)) for n, m in model.named_modules()
            if hasattr(m, SKIP_REASON_ATTR)]


def resident_weight_bytes(model) -> int:
    """Bytes held by the model's parameters and buffers (each storage counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        t = tensor_parallel.local(t)  # this rank's part of a DTensor
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total

