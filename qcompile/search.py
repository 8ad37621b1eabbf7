"""``qcompile.search_policy``: the per-layer policy that loses least under a bit budget.

1. Bits: every searched layer is quantised once with every candidate; the packed QTensor's
   stored bytes (codes, scales, padding, outliers) are its cost, exactly what ``explain``
   counts after ``quantize_model_``; a layer left in full precision costs its float bits.
2. Sensitivity: the KL divergence of the model's next-token distribution, against the
   full-precision model on the calibration tokens, when that one layer alone runs with a
   candidate (its weight swapped for the dequantised one, its input fake-quantised by a
   forward pre-hook). Decoder blocks before the layer's block replay their recorded outputs,
   so a pass runs only the blocks from the changed one on.
3. Choice: minimise the summed sensitivities subject to the summed stored bits <= budget, a
   multiple-choice knapsack solved exactly by dynamic programming (``solve_budget``).
4. Check and refine: all chosen layers at once, end to end (KL and top-1 agreement). The
   losses of one decoder block's layers interact, so each block's chosen layers are measured
   together, that block's sensitivities scaled by measured / estimated, and the knapsack solved
   again; the new choice is kept if it measures a lower KL end to end (``REFINE_ROUNDS``
   rounds at most). A uniform candidate that fits the budget and measures better still is
   returned instead, and the result says so.

Mixture-of-experts tensors (qcompile.experts) are layers of the search like linear layers: a
candidate packs each expert's matrix along its reduction axis, as ``quantize_model_`` does; its
cost is the stored bits of all experts, its sensitivity the KL with the dequantised experts in
the model. Their inputs take no activation format (``quantize_model_`` applies none to
experts), so a candidate's activation part does not change them, and a proxy candidate, which
expert tensors refuse, leaves them in full precision.

Under torch.distributed (``torchrun --nproc-per-node N``) the independent measurements (the
sensitivity passes, the refinement's block measurements, the uniform checks) are dealt round
robin to the ranks and gathered; every rank quantises everything and solves identically, so
each rank returns what one process would, bit for bit.

docs/search.md explains the method and its resolution.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import re
import time
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from . import api, config, experts
from .policy import LayerSpec, Policy, PolicyError
from .proxy import input_scores
from .swap import linear_layers

#: Cost-axis cells of the dynamic programme (its memory: layers x cells x 2 bytes).
MAX_UNITS = 1 << 17
#: Rounds of the block-interaction refinement (each: one pass per block, one end-to-end check).
REFINE_ROUNDS = 2
FULL_PRECISION = "full precision"


def kl_and_top1(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Mean KL(P_ref || P) of the next-token distributions (nats per position) and the fraction
    of positions whose most likely token agrees, over every position of logits [..., vocab]."""
    if ref_logits.shape != logits.shape:
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not match the reference's "
                         f"{tuple(ref_logits.shape)}")
    ref = F.log_softmax(ref_logits.reshape(-1, ref_logits.shape[-1]).float(), -1)
    return _kl_top1(ref, ref.argmax(-1), logits)


def _kl_top1(ref_logp, ref_top, logits) -> tuple[float, float]:
    """kl_and_top1 against reference log-probabilities and top tokens computed once."""
    lq = F.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), -1)
    kl = (ref_logp.exp() * (ref_logp - lq)).sum(-1)
    top1 = (ref_top == lq.argmax(-1)).double().mean()
    return kl.double().mean().item(), top1.item()


def solve_budget(sensitivity, cost, budget: int, max_units: int = MAX_UNITS) -> list[int]:
    """The choice per layer minimising ``sum(sensitivity[i][c_i])`` subject to
    ``sum(cost[i][c_i]) <= budget`` (integer costs), by dynamic programming over the cost
    above each layer's cheapest choice. Costs are counted in cells of ``step`` units: their
    greatest common divisor when the budget spans at most ``max_units`` of those (the solution
    is then exact), else ``ceil(room / max_units)``, with every cost rounded up (the budget is
    never exceeded; the answer is at least as good as the optimum under ``budget - layers *
    step``). Ties go to the cheaper total, then to earlier candidates."""
    sens = np.asarray(sensitivity, dtype=np.float64)
    costs = [[int(c) for c in row] for row in cost]
    base = [min(row) for row in costs]
    room = int(budget) - sum(base)
    if room < 0:
        raise ValueError(f"no choice fits the budget: the cheapest choices cost {sum(base)}, "
                         f"the budget is {budget}")
    extra = [[c - b for c in row] for row, b in zip(costs, base)]
    g = math.gcd(*[e for row in extra for e in row]) or 1
    step = max(g, -(-room // max_units))
    units = [[-(-e // step) for e in row] for row in extra]
    cap = room // step
    dp = np.full(cap + 1, np.inf)
    dp[0] = 0.0
    picks = np.empty((len(costs), cap + 1), dtype=np.int16)
    for i, row in enumerate(units):
        new, pick = np.full(cap + 1, np.inf), np.full(cap + 1, -1, dtype=np.int16)
        for j, u in enumerate(row):
            if u > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[u:] = dp[: cap + 1 - u] + sens[i, j]
            better = cand < new
            new[better], pick[better] = cand[better], j
        dp, picks[i] = new, pick
    c = int(np.argmin(dp))  # the first minimum: the cheapest total among equal losses
    choice = [0] * len(costs)
    for i in reversed(range(len(costs))):
        choice[i] = int(picks[i, c])
        c -= units[i][choice[i]]
    return choice


@dataclass
class Sensitivities:
    """What the passes measured, reusable for other budgets (``search_policy(...,
    sensitivities=result.sensitivities)``). ``kl[i][j]``: layer i alone with candidate j;
    ``cost[i][j]``: its stored bits. Holds the packed weights of every (layer, candidate)."""
    layers: list[str]
    numel: list[int]
    candidates: list  # LayerSpec or None
    labels: list[str]
    kl: np.ndarray
    cost: list[list[int]]
    packed: dict = field(repr=False, default_factory=dict)  # (i, j) -> QTensor (a list per expert)
    passes: int = 0
    passes_by_rank: list = field(default_factory=list)  # how many each process measured
    seconds: dict = field(default_factory=dict)


@dataclass
class LayerChoice:
    name: str
    choice: str
    sensitivity: float
    bits: float
    numel: int


@dataclass
class SearchResult:
    policy: Policy
    bits: float  # stored bits per weight over the searched layers
    budget: float
    table: list[LayerChoice]
    estimated_kl: float  # the sum of the chosen layers' sensitivities
    kl: float  # measured on the calibration tokens, every chosen layer at once
    top1: float
    uniform: dict  # candidate label -> {"bits", "kl", "top1"} for uniform choices in budget
    note: str
    sensitivities: Sensitivities = field(repr=False)
    seconds: dict = field(default_factory=dict)
    # per refinement round: the knapsack's estimate and the end-to-end KL of its new choice,
    # and whether it was kept (it measured lower than the choice before it)
    refinement: list = field(default_factory=list)

    def __str__(self) -> str:
        w = max(len(r.name) for r in self.table)
        lines = [f"{'layer'.ljust(w)}  {'choice':<24} {'KL alone':>10} {'bits':>7}"]
        lines += [f"{r.name.ljust(w)}  {r.choice:<24} {r.sensitivity:10.3e} {r.bits:7.3f}"
                  for r in self.table]
        lines.append(f"budget {self.budget:g} bits/weight: {self.bits:.4f} used; KL estimated "
                     f"{self.estimated_kl:.4e} (sum), measured {self.kl:.4e}; top-1 agreement "
                     f"{100 * self.top1:.2f}%")
        lines += [f"refinement round {k + 1}: KL estimated {r['estimated']:.4e}, measured "
                  f"{r['measured']:.4e}, {'kept' if r['kept'] else 'not kept'}"
                  for k, r in enumerate(self.refinement)]
        lines += [f"uniform {k}: {u['bits']:.4f} bits, KL {u['kl']:.4e}, top-1 "
                  f"{100 * u['top1']:.2f}%" for k, u in self.uniform.items()]
        return "\n".join(lines + ([self.note] if self.note else []))


# -- validation -------------------------------------------------------------------------------

def _label(spec) -> str:
    if spec is None:
        return FULL_PRECISION
    if spec.act is None:
        return spec.weight.key
    return f"{spec.weight.key if spec.weight else '-'} + act {spec.act.key}"


def _candidates(candidates) -> list:
    if isinstance(candidates, (str, LayerSpec)) or not hasattr(candidates, "__iter__"):
        raise ValueError(f"candidates must be a list of format keys, LayerSpecs or None, got "
                         f"{type(candidates).__name__} {candidates!r}")
    out = []
    for c in candidates:
        if c is not None and not isinstance(c, LayerSpec):
            c = LayerSpec(weight=c)  # PolicyError naming the format and the valid ones
        if c is not None and c.op not in (None, "linear"):
            raise PolicyError(f"candidate {c!r}: the search chooses formats of linear layers; "
                              "op must be None or 'linear'")
        if c not in out:
            out.append(c)
    if not out:
        raise ValueError("candidates is empty: give format keys (e.g. 'nf4', 'mxint8', "
                         "'int4[block_size=32]'), LayerSpecs or None (full precision); "
                         "qcompile.formats.names() lists the presets")
    return out


def _batches(model, calibration) -> list[torch.Tensor]:
    batches = [calibration] if isinstance(calibration, torch.Tensor) else calibration
    hint = "calibration must be token ids: an integer tensor [batch, tokens] or a list of them"
    if not isinstance(batches, (list, tuple)) or not batches:
        raise ValueError(f"{hint}, got {type(calibration).__name__}")
    table = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(table, "num_embeddings", None)
    out = []
    for b in batches:
        if not isinstance(b, torch.Tensor):
            raise ValueError(f"{hint}; an element is a {type(b).__name__}")
        if b.dtype == torch.bool or b.dtype.is_floating_point or b.dtype.is_complex:
            raise ValueError(f"{hint}; got a {b.dtype} tensor")
        if b.dim() != 2 or b.numel() == 0:
            raise ValueError(f"{hint}; got shape {tuple(b.shape)} (a single sequence is ids[None])")
        if int(b.min()) < 0 or (vocab is not None and int(b.max()) >= vocab):
            raise ValueError(f"calibration ids must lie in [0, {vocab}) (the model's vocabulary); "
                             f"got {int(b.min())}..{int(b.max())}")
        out.append(b.long())
    return out


def _budget(bits) -> Fraction:
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits) \
            or bits <= 0:
        raise ValueError(f"bits must be a positive number of bits per weight, got {bits!r}")
    return Fraction(bits)


class _ExpertSlot:
    """A mixture-of-experts tensor as the search handles a layer: ``weight`` reads and replaces
    the 3-d parameter the experts module's forward reads; ``axis`` of the layer tuple is the
    reduction axis of each expert's 2-d matrix."""

    takes_act = False  # quantize_model_ applies no activation format to expert tensors

    def __init__(self, t: experts.ExpertTensor):
        self.module, self.attr = t.module, t.attr

    @property
    def weight(self) -> torch.Tensor:
        return self.module._parameters[self.attr]

    @weight.setter
    def weight(self, value):
        self.module._parameters[self.attr] = value


def _searched_layers(model, patterns, keep: Policy) -> list[tuple[str, object, int]]:
    """(name, module, axis) of the linear layers, and (name, _ExpertSlot, axis) of the expert
    tensors, matched by ``patterns`` and by no keep rule."""
    from torch.nn.utils import parametrize
    if isinstance(patterns, str):
        patterns = [patterns]
    chooser = Policy([(p, None) for p in patterns]) if patterns is not None else None

    def searched(name):
        return keep.match(name)[0] is None and (chooser is None or
                                                chooser.match(name)[0] is not None)
    out = []
    for name, mod, _, axis, _ in linear_layers(model, Policy({}, default=LayerSpec("int8")),
                                               "search_policy"):
        if not searched(name):
            continue
        if parametrize.is_parametrized(mod, "weight"):
            config.warn(f"search_policy: layer {name!r} is not searched: its weight is computed "
                        "by a parametrization", once=("search", id(mod)))
            continue
        out.append((name, mod, axis))
    wanted = {name for name, _, _ in experts.candidates(model) if searched(name)}
    if wanted:
        found, unrecognised = experts.expert_tensors(model, wanted)
        out += [(t.name, _ExpertSlot(t), t.axis - 1) for t in found]
        for name, why in unrecognised.items():
            config.warn(f"search_policy: {name!r} is not searched: {why}",
                        once=("search experts", name))
    if not out:
        raise ValueError(f"search_policy: the model has no quantisable layer to search "
                         f"(nn.Linear or GPT-2 Conv1D, matched by patterns={patterns!r} and by no "
                         f"keep rule)")
    return out


def _float_bits(w: torch.Tensor) -> int:
    return torch.finfo(w.dtype).bits  # what explain counts for a full-precision weight


def _check_nominal(layers, cands, budget: Fraction):
    """Refuse a budget below the cheapest candidate's nominal bits (a lower bound of the stored
    bits) before anything is quantised or run."""
    def nominal(spec, mod, axis):
        w = mod.weight
        if spec is None or spec.weight is None:
            return _float_bits(w)
        return spec.weight.effective_bits(w.shape[axis + w.dim() - 2])  # experts: [E, a, b]
    total = sum(m.weight.numel() for _, m, _ in layers)
    best = {_label(c): sum(nominal(c, m, a) * m.weight.numel() for _, m, a in layers) / total
            for c in cands}
    cheapest = min(best, key=best.get)
    if best[cheapest] > budget:
        raise ValueError(f"bits={float(budget):g} is below the cheapest candidate: "
                         f"{cheapest} needs {best[cheapest]:.4f} bits per weight; candidates: "
                         + ", ".join(f"{k} {v:.4f}" for k, v in best.items()))


# -- running the model -----------------------------------------------------------------------

def _blocks(model, names: list[str]):
    """(prefix, ModuleList) of the list of blocks holding the most searched layers, or None."""
    best, count = None, 0
    for prefix, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 1 and prefix:
            n = sum(1 for name in names if name.startswith(prefix + "."))
            if n > count:
                best, count = (prefix, mod), n
    return best


class _Runner:
    """Runs the model on the calibration batches. With a list of decoder blocks found, the
    full-precision pass records each block's output, and a later pass can start at block k:
    blocks before it return their recorded outputs (checked once to give the same logits)."""

    def __init__(self, model, batches, names):
        self.model, self.batches = model, batches
        params = inspect.signature(model.forward).parameters
        self.kwargs = {"use_cache": False} if "use_cache" in params else {}
        found = _blocks(model, names)
        self.prefix, self.blocks = found if found else (None, None)
        self.outputs = [[None] * len(self.blocks) for _ in batches] if self.blocks else None
        ref = self._record()
        self.ref_logp = F.log_softmax(ref, -1)
        self.ref_top = ref.argmax(-1)
        if self.blocks is not None and not torch.equal(self.logits(len(self.blocks) - 1), ref):
            config.warn("search_policy: replaying the recorded block outputs changed the logits; "
                        "every pass runs the whole model", once=("search replay", id(model)))
            self.blocks = None

    def compare(self, logits) -> tuple[float, float]:
        """KL and top-1 agreement of ``logits`` against the full-precision model's."""
        return _kl_top1(self.ref_logp, self.ref_top, logits)

    def block_of(self, name: str) -> int:
        """The first block a change to layer ``name`` affects (0: run everything)."""
        return max(self.group_of(name), 0)

    def group_of(self, name: str) -> int:
        """The index of the block holding layer ``name``; -1 outside every block."""
        if self.blocks is None or not name.startswith(self.prefix + "."):
            return -1
        return int(name[len(self.prefix) + 1:].split(".")[0])

    def _record(self) -> torch.Tensor:
        if self.blocks is None:
            return self.logits(0)
        order, hooks = [], []
        for j, block in enumerate(self.blocks):
            def hook(mod, args, out, j=j):
                order.append(j)
                self.outputs[self._batch][j] = out
            hooks.append(block.register_forward_hook(hook))
        try:
            ref = self.logits(0)
        finally:
            for h in hooks:
                h.remove()
        if order != list(range(len(self.blocks))) * len(self.batches):
            self.blocks = None  # blocks called out of order or more than once: no replay
        return ref

    def _replay(self, j):
        def forward(*args, **kwargs):
            out = self.outputs[self._batch][j]
            return out.clone() if isinstance(out, torch.Tensor) else tuple(
                o.clone() if isinstance(o, torch.Tensor) else o for o in out)
        return forward

    @torch.no_grad()
    def logits(self, start: int = 0) -> torch.Tensor:
        """Logits [positions, vocab] over every batch, blocks before ``start`` replayed."""
        skipped = list(self.blocks[:start]) if self.blocks is not None else []
        for j, block in enumerate(skipped):
            block.forward = self._replay(j)
        try:
            out = []
            for self._batch, ids in enumerate(self.batches):
                r = self.model(ids.to(_device(self.model)), **self.kwargs)
                r = r.logits if hasattr(r, "logits") else r[0] if isinstance(r, tuple) else r
                out.append(r.reshape(-1, r.shape[-1]).float())
            return torch.cat(out)
        finally:
            for block in skipped:
                del block.forward


def _device(model):
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def _applied(mod, weight, act):
    """The layer with ``weight`` (a tensor, or None: unchanged) and inputs fake-quantised to
    ``act`` (None: unchanged); the original parameter object comes back afterwards (a tied
    weight stays shared with its other holders)."""
    orig = mod.weight
    handle = None
    try:
        if weight is not None:
            mod.weight = torch.nn.Parameter(weight, requires_grad=False)
        if act is not None and getattr(mod, "takes_act", True):
            handle = mod.register_forward_pre_hook(
                lambda m, args: (api.fake_quantize(args[0], act, axis=-1), *args[1:]))
        yield
    finally:
        mod.weight = orig
        if handle is not None:
            handle.remove()


# -- many processes (torch.distributed) -------------------------------------------------------

def _world() -> tuple[int, int]:
    """(this rank, number of ranks) of torch.distributed's default group; (0, 1) without it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shares(jobs: int) -> list[int]:
    """How many of ``jobs`` each rank measures under _spread's round robin."""
    ranks = _world()[1]
    return [len(range(r, jobs, ranks)) for r in range(ranks)]


def _bar(progress: bool, **kwargs):
    """A tqdm wrapper for an iterable, shown on rank 0 only."""
    show = progress and _world()[0] == 0
    return lambda it: tqdm(it, disable=not show, **kwargs)


def _spread(jobs: list, measure, bar=None) -> list:
    """[measure(job) for job in jobs]. Under torch.distributed job k is measured on rank
    k % ranks only and the results are gathered, in order, on every rank; a failure on any rank
    raises on every rank (none waits for the others forever)."""
    rank, ranks = _world()
    bar = bar or list
    if ranks == 1:
        return [measure(job) for job in bar(jobs)]
    done, error = {}, None
    try:
        for k in bar(range(rank, len(jobs), ranks)):
            done[k] = measure(jobs[k])
    except Exception as e:  # reported to the other ranks, then raised here
        error = e
    every = [None] * ranks
    dist.all_gather_object(every, (done, error and f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    failed = [(r, why) for r, (_, why) in enumerate(every) if why]
    if failed:
        raise RuntimeError(f"search_policy: rank {failed[0][0]} failed: {failed[0][1]}")
    merged = {k: v for part, _ in every for k, v in part.items()}
    return [merged[k] for k in range(len(jobs))]


def _digest(*items) -> str:
    """A hash of tensors, arrays and other values (by repr), bit for bit."""
    h = hashlib.sha256()
    for x in items:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().contiguous().numpy()
        h.update(x.tobytes() if isinstance(x, np.ndarray) else repr(x).encode())
    return h.hexdigest()[:16]


def _agree(facts: dict):
    """Under torch.distributed, refuse (on every rank alike) when the ranks' ``facts`` differ:
    the gathered results equal one process's only if every rank runs the same search."""
    ranks = _world()[1]
    if ranks == 1:
        return
    every = [None] * ranks
    dist.all_gather_object(every, facts)
    for r, theirs in enumerate(every):
        for key, value in theirs.items():
            if value != every[0][key]:
                raise ValueError(
                    f"search_policy on {ranks} processes: rank {r} and rank 0 differ in {key} "
                    f"({value!r} against {every[0][key]!r}); every rank must run the same "
                    "search (the same model weights, calibration tokens, bits, candidates, "
                    "patterns and keep rules) and compute bit for bit alike (the same kind of "
                    "device and thread count)")


# -- the search -------------------------------------------------------------------------------

def _quantise(layers, cands, scores, progress) -> Sensitivities:
    """Every (layer, candidate) packed once: its stored bits, and the weight its passes use.
    ``scores``: proxy column scores by layer name (for candidates with the proxy option)."""
    n, m = len(layers), len(cands)
    s = Sensitivities([x[0] for x in layers], [x[1].weight.numel() for x in layers], cands,
                      [_label(c) for c in cands], np.zeros((n, m)), [[0] * m for _ in range(n)])
    start = time.perf_counter()
    for i, (name, mod, axis) in enumerate(tqdm(layers, desc="search: quantising", unit="layer",
                                               disable=not progress, leave=False)):
        w = mod.weight.detach()
        for j, c in enumerate(cands):
            stack = isinstance(mod, _ExpertSlot)
            if c is None or c.weight is None or (stack and c.weight.proxy is not None):
                s.cost[i][j] = w.numel() * _float_bits(w)  # (experts refuse proxy formats)
            elif stack:  # each expert's matrix, as quantize_model_ packs it
                qs = s.packed[i, j] = [api.quantize(w[e], c.weight, axis=axis)
                                       for e in range(w.shape[0])]
                s.cost[i][j] = 8 * sum(q.nbytes for q in qs)
            else:
                score = scores[name] if c.weight.proxy is not None else None
                q = s.packed[i, j] = api.quantize(w, c.weight, axis=axis, proxy_score=score)
                s.cost[i][j] = 8 * q.nbytes
    s.seconds["quantise"] = time.perf_counter() - start
    return s


def _run_passes(runner, layers, s: Sensitivities, progress):
    start = time.perf_counter()
    todo = [(i, j) for i in range(len(layers)) for j, c in enumerate(s.candidates) if c is not None]

    def one(pair):
        i, j = pair
        name, mod, _ = layers[i]
        with _applied(mod, _weight(s, i, j), s.candidates[j].act):
            kl, _ = runner.compare(runner.logits(runner.block_of(name)))
        return max(kl, 0.0)  # KL >= 0; a float32 rounding below it is noise
    bar = _bar(progress, desc="search: sensitivity", unit="pass")
    for (i, j), kl in zip(todo, _spread(todo, one, bar)):
        s.kl[i, j] = kl
    s.passes = len(todo)
    s.passes_by_rank = _shares(len(todo))
    s.seconds["sensitivity"] = time.perf_counter() - start


def _weight(s: Sensitivities, i, j):
    q = s.packed.get((i, j))
    if isinstance(q, list):  # an expert stack
        return torch.stack([api.dequantize(e) for e in q])
    return api.dequantize(q) if q is not None else None


def _measure(runner, layers, s: Sensitivities, picks, start: int = 0) -> tuple[float, float]:
    """KL and top-1 with the layers ``picks`` ({layer index: candidate index}) applied together,
    the blocks before ``start`` replayed."""
    with contextlib.ExitStack() as stack:
        for i, j in picks.items():
            if s.candidates[j] is not None:
                stack.enter_context(_applied(layers[i][1], _weight(s, i, j),
                                             s.candidates[j].act))
        return runner.compare(runner.logits(start))


def _measure_all(runner, layers, s: Sensitivities, choice) -> tuple[float, float]:
    return _measure(runner, layers, s, dict(enumerate(choice)))


def _refine(runner, layers, s: Sensitivities, choice, limit: int, kl, top1):
    """The block-interaction refinement (module docstring, step 4): returns the choice, its KL
    and top-1 agreement, and one record per round."""
    rounds = []
    for _ in range(REFINE_ROUNDS):
        groups: dict[int, list[int]] = {}
        for i, (name, _, _) in enumerate(layers):
            groups.setdefault(runner.group_of(name), []).append(i)
        scale = np.ones(len(layers))
        estimated = {g: sum(s.kl[i, choice[i]] for i in members)
                     for g, members in groups.items()}
        # estimated 0: nothing changed there, or nothing measurable: no evidence
        todo = [g for g in groups if estimated[g] > 0]
        measured = _spread(todo, lambda g: _measure(
            runner, layers, s, {i: choice[i] for i in groups[g]}, max(g, 0))[0])
        for g, kl_g in zip(todo, measured):
            scale[groups[g]] = max(kl_g, 0.0) / estimated[g]
        scaled = s.kl * scale[:, None]
        new = solve_budget(scaled, s.cost, limit)
        if new == choice:
            break
        new_kl, new_top1 = _measure_all(runner, layers, s, new)
        kept = new_kl < kl
        rounds.append({"estimated": float(sum(scaled[i, j] for i, j in enumerate(new))),
                       "measured": new_kl, "kept": kept})
        if not kept:
            break
        choice, kl, top1 = new, new_kl, new_top1
    return choice, kl, top1, rounds


def _exact(name: str) -> str:
    """A policy pattern matching exactly this module name."""
    return "re:" + re.escape(name) if any(ch in name for ch in "*?[]") else name


def search_policy(model: torch.nn.Module, calibration, bits: float, candidates, *,
                  patterns=None, keep=None, progress: bool = True,
                  sensitivities: Sensitivities | None = None,
                  refine: bool = True) -> SearchResult:
    """The per-layer policy, one candidate per searched linear layer, that minimises the summed
    single-layer KL divergences while the searched layers' stored bits per weight (as
    ``qcompile.explain`` counts them after ``quantize_model_``) stay within ``bits``.

    ``calibration``: token ids [batch, tokens] or a list of them; ``candidates``: format keys,
    ``LayerSpec``s (weight and activation) or None (full precision); ``patterns``: policy
    patterns restricting the searched layers; ``keep``: policy rules (a dict, a list of pairs or
    a Policy, whose default is kept too) that stay as they are; their layers are not searched.
    ``sensitivities``: a previous result's, to solve another budget without the passes;
    ``refine``: run the block-interaction refinement (a few dozen passes)."""
    cands = _candidates(candidates)
    budget = _budget(bits)
    keep = keep if isinstance(keep, Policy) else Policy(keep or {})
    batches = _batches(model, calibration)
    layers = _searched_layers(model, patterns, keep)
    _check_nominal(layers, cands, budget)
    names = [x[0] for x in layers]
    proxied = any(c is not None and c.weight is not None and c.weight.proxy is not None
                  for c in cands)
    linear = [n for n, mod, _ in layers if not isinstance(mod, _ExpertSlot)]
    scores = input_scores(model, linear) if proxied and sensitivities is None else {}
    if sensitivities is not None and (sensitivities.layers != names
                                      or sensitivities.candidates != cands):
        raise ValueError("sensitivities were measured for other layers or candidates; measure "
                         "again (sensitivities=None)")
    _agree({"layers": (len(names), _digest(names)), "candidates": [_label(c) for c in cands],
            "bits": float(budget), "calibration": ([tuple(b.shape) for b in batches],
                                                   _digest(*batches)),
            "sensitivities": sensitivities is not None and _digest(sensitivities.kl,
                                                                    sensitivities.cost)})
    was_training = model.training
    model.eval()
    try:
        s = sensitivities or _quantise(layers, cands, scores, progress and _world()[0] == 0)
        total = sum(s.numel)
        limit = math.floor(budget * total)
        cheapest = sum(min(row) for row in s.cost)
        if cheapest > limit:
            raise ValueError(f"bits={float(budget):g} is below the cheapest choice: the searched "
                             f"layers need at least {cheapest / total:.4f} bits per weight stored")
        start = time.perf_counter()
        runner = _Runner(model, batches, names)
        _agree({"full-precision logits": _digest(runner.ref_logp),
                "replay of block outputs": runner.blocks is not None})
        reference_s = time.perf_counter() - start
        if sensitivities is None:
            _run_passes(runner, layers, s, progress)
        start = time.perf_counter()
        choice = solve_budget(s.kl, s.cost, limit)
        solve_s = time.perf_counter() - start
        start = time.perf_counter()
        fits = [j for j, c in enumerate(s.candidates)
                if c is not None and sum(row[j] for row in s.cost) <= limit]
        # the choice and each uniform candidate within the budget, end to end
        (kl, top1), *measured = _spread([choice] + [[j] * len(layers) for j in fits],
                                        lambda picks: _measure_all(runner, layers, s, picks))
        uniform = {s.labels[j]: {"bits": sum(row[j] for row in s.cost) / total, "kl": u_kl,
                                 "top1": u_top1} for j, (u_kl, u_top1) in zip(fits, measured)}
        rounds, note = [], ""
        if refine:
            choice, kl, top1, rounds = _refine(runner, layers, s, choice, limit, kl, top1)
        best = min(uniform, key=lambda k: uniform[k]["kl"], default=None)
        if best is not None and uniform[best]["kl"] < kl:
            note = (f"note: the searched choice measured KL {kl:.4e} end to end, worse than "
                    f"uniform {best} ({uniform[best]['kl']:.4e}) within the budget; the "
                    "uniform choice is returned (the single-layer losses did not add up)")
            choice = [s.labels.index(best)] * len(layers)
            kl, top1 = uniform[best]["kl"], uniform[best]["top1"]
        check_s = time.perf_counter() - start
    finally:
        model.train(was_training)
    table = [LayerChoice(names[i], s.labels[j], float(s.kl[i, j]), s.cost[i][j] / s.numel[i],
                         s.numel[i]) for i, j in enumerate(choice)]
    rules = [(r.pattern, r.spec) for r in keep.rules]
    rules += [(_exact(names[i]), s.candidates[j]) for i, j in enumerate(choice)]
    seconds = {**s.seconds, "reference": reference_s, "solve": solve_s, "check": check_s}
    return SearchResult(Policy(rules, default=keep.default),
                        sum(s.cost[i][j] for i, j in enumerate(choice)) / total, float(budget),
                        table, float(sum(s.kl[i, j] for i, j in enumerate(choice))), kl, top1,
                        uniform, note, s, seconds, rounds)
