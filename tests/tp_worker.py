"""The ranks of tests/test_tensor_parallel.py: run under ``torchrun --nproc-per-node 2``
(gloo, CPU) as ``tp_worker.py FOLDER OUT.json``; FOLDER holds the tiny checkpoints the test
saved. Every rank runs each case; rank 0 adds the single-process oracle (float loading, then
quantize_model_) and writes one JSON object of results, {case: {...}}."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

sys.path.insert(0, str(Path(__file__).parent))
import qcompile  # noqa: E402
from qcompile import LayerSpec, Policy  # noqa: E402
from qcompile.expert_stack import PackedExperts  # noqa: E402
from qcompile.proxy import input_scores  # noqa: E402
from qcompile.swap import QuantLinear  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 2, 77, 3, 120, 64, 11]])
NF4 = Policy({"lm_head": None}, default=LayerSpec(weight="nf4"))
MIXED = Policy({"lm_head": LayerSpec(weight="int4"),  # tied to the embedding: packed after loading
                "*.mlp.down_proj": LayerSpec(weight="bof4s_opq"),  # row-parallel, outliers
                "re:.*self_attn\\.[qk]_proj": LayerSpec(weight="mxint8", act="mxint8")},
               default=LayerSpec(weight="int4"))
ALL_NF4 = Policy({}, default=LayerSpec(weight="nf4"))  # GPT-2's tied lm_head too
NVFP4 = Policy({"lm_head": None}, default=LayerSpec(weight="nvfp4"))
QUANTILE = Policy({"lm_head": None}, default=LayerSpec(weight="quantile4"))
# whole-tensor side data split both ways (q/k/v, gate/up column-, o/down row-parallel), with an
# activation format on a row-parallel layer whose blocks the split keeps whole
WHOLE_MIXED = Policy({"lm_head": None, "*.mlp.*": LayerSpec(weight="quantile4"),
                      "*.self_attn.o_proj": LayerSpec(weight="nvfp4", act="mxint8")},
                     default=LayerSpec(weight="nvfp4"))
ACT_NVFP4 = Policy({"lm_head": None, "*.self_attn.o_proj": LayerSpec(weight="int4", act="nvfp4")},
                   default=LayerSpec(weight="int4"))
MOE_NF4 = NF4  # experts (gate_up packed_colwise, down rowwise) and attention
# each expert's own tensor scale / codebook: gate_up split by rows, down along K
MOE_WHOLE = Policy({"lm_head": None, "*.experts.gate_up_proj": LayerSpec(weight="nvfp4"),
                    "*.experts.down_proj": LayerSpec(weight="quantile4")}, default=None)
# proxy columns on every kind of layer and split: q/k/v, gate/up, lm_head column-parallel (their
# scores from o_proj / down_proj / the embedding, split along their rows' K, so gathered whole),
# o_proj and down_proj row-parallel (scored by v_proj, gate and up: whole rows on each rank), with
# a quantile codebook (o_proj: one proxy column, so one rank holds none) and OPQ outliers
# (down_proj) beside the proxy columns
PROXY_MIXED = Policy({"lm_head": LayerSpec(weight="nf4[proxy=8]"),
                      "*.mlp.down_proj": LayerSpec(weight="bof4s_opq[proxy=0.05]"),
                      "*.self_attn.o_proj": LayerSpec(weight="quantile4[proxy=1]")},
                     default=LayerSpec(weight="nf4[proxy=8]"))
GPT2_PLAN = {"lm_head": "colwise_gather_output"}  # its own lm_head (untied): vocab-sharded
CONV1D_PLAN = {"transformer.h.*.mlp.c_fc": "colwise"}


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def packed_bytes(model, only=None) -> int:
    """Bytes of the packed layers and expert stacks (those named ``only``, or all)."""
    return sum(t.numel() * t.element_size() for n, m in model.named_modules()
               if isinstance(m, (QuantLinear, PackedExperts)) and (only is None or n in only)
               for t in m.buffers())


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().flatten().view(torch.uint8)


def my_part(q, got_shape, rank: int):
    """The (codes, scales) of rank ``rank``'s part of the whole packed weight ``q`` [N, K]
    (blocks along K) whose part has shape ``got_shape``: torch.chunk's rows (column-parallel)
    or columns (row-parallel, whole blocks and bytes)."""
    n, k = q.shape
    if got_shape[0] != n:
        lo = rank * -(-n // 2)
        return q.codes[lo:lo + got_shape[0]], q.scales[lo:lo + got_shape[0]]
    lo, width = rank * -(-k // 2), got_shape[1]
    b = q.fmt.element.bits
    return (q.codes[:, lo * b // 8:(lo + width) * b // 8],
            q.scales[:, lo // q.block:(lo + width) // q.block])


def apart_map(q) -> torch.Tensor:
    """The weights ``q`` [N, K] keeps apart from its blocks (proxy columns, OPQ outliers) laid
    out in its padded [N, n_blocks * block] grid, NaN elsewhere: how its side data is split
    does not change it."""
    rows, row_len = q.codes.shape[0], q.scales.shape[-1] * q.block
    grid = torch.full((rows, row_len), float("nan"))
    if "proxy_index" in q.side:
        grid[:, q.side["proxy_index"].long()] = q.side["proxy_value"].float()
    if "outlier_index" in q.side:
        grid.view(-1)[q.side["outlier_index"].long()] = q.side["outlier_value"].float()
    return grid


def same_map(got, want) -> bool:
    return torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(),
                                                                  want.nan_to_num())


def my_map(q, got, rows=None) -> torch.Tensor:
    """apart_map of this rank's part ``got`` cut from the whole ``q``: ``rows`` when given,
    else torch.chunk's rows or (whole blocks of) columns."""
    grid, rank = apart_map(q), dist.get_rank()
    if rows is not None:
        return grid[rows]
    if got.shape[0] != q.shape[0]:
        lo = rank * -(-q.shape[0] // 2)
        return grid[lo:lo + got.shape[0]]
    lo = rank * -(-q.shape[1] // 2)
    return grid[:, lo:lo + got.scales.shape[-1] * got.block]


def shards_exact(model, folder, policy) -> dict:
    """Each sharded packed layer of ``model`` against this rank's part of its float weight
    packed whole by qcompile.quantize (the definition, in one process; a proxy format's scores
    from the one-process model): codes, scales and side data compared bit for bit (the
    weights kept apart by where they sit). The names of those that differ, and how many were
    sharded."""
    whole = AutoModelForCausalLM.from_pretrained(folder).eval()
    specs = {n: policy.match(n, "linear")[1].weight for n, m in model.named_modules()
             if isinstance(m, QuantLinear)}
    scores = input_scores(whole, [n for n, f in specs.items() if f.proxy is not None])
    return layers_exact(model, lambda name: qcompile.quantize(
        whole.get_submodule(name).weight.detach(), specs[name], axis=1,
        proxy_score=scores.get(name)))


def saved_shards_exact(model, folder, policy=None) -> dict:
    """shards_exact for a saved packed folder: against the packed weights of the folder loaded
    in one process."""
    whole = load(folder)
    return layers_exact(model, lambda name: whole.get_submodule(name).qtensor())


def layers_exact(model, whole_of) -> dict:
    """Each sharded packed layer of ``model`` against this rank's part of ``whole_of(name)``,
    its whole packed weight."""
    differ, sharded, rank = [], 0, dist.get_rank()
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        got, want = mod.qtensor(), whole_of(name)
        if got.shape == want.shape:
            continue
        sharded += 1
        codes, scales = my_part(want, got.shape, rank)
        same = [torch.equal(bits(got.codes), bits(codes)),
                torch.equal(bits(got.scales), bits(scales)), set(got.side) == set(want.side),
                same_map(apart_map(got), my_map(want, got))]
        same += [torch.equal(bits(got.side[k]), bits(want.side[k]))
                 for k in want.fmt.whole_tensor_side]
        if not all(same):
            differ.append(name)
    return {"differ": differ, "sharded": sharded}


def expert_rows(n: int, got: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s rows of a fused [gate; up] expert matrix of ``n`` rows split by
    transformers' packed_colwise: its chunk of the gate half, then of the up half."""
    half = got // 2
    mine = torch.arange(rank * half, (rank + 1) * half)
    return torch.cat([mine, n // 2 + mine])


def experts_exact(model, folder, policy) -> dict:
    """shards_exact for the packed expert stacks: each expert's matrix of this rank against its
    part of the expert's float matrix packed whole by qcompile.quantize (blocks along its last
    axis: F.linear(x, W[e]))."""
    whole, rank = AutoModelForCausalLM.from_pretrained(folder).eval(), dist.get_rank()
    differ, sharded = [], 0
    for name, mod in model.named_modules():
        if not isinstance(mod, PackedExperts):
            continue
        sharded += 1
        w, fmt = whole.get_parameter(name).detach(), policy.match(name, "linear")[1].weight
        for e in range(w.shape[0]):
            want = qcompile.quantize(w[e], fmt, axis=1)
            got_shape = mod.matrix_shape  # this rank's part of each expert's matrix
            if got_shape[0] != want.shape[0]:
                rows = expert_rows(want.shape[0], got_shape[0], rank)
                codes, scales = want.codes[rows], want.scales[rows]
            else:
                codes, scales = my_part(want, got_shape, rank)
            same = [torch.equal(bits(mod.codes[e]), bits(codes)),
                    torch.equal(bits(mod.scales[e]), bits(scales))]
            same += [torch.equal(bits(getattr(mod, f"side_{k}")[e]), bits(want.side[k]))
                     for k in want.side]
            if not all(same):
                differ.append(f"{name}[{e}]")
    return {"differ": differ, "sharded": sharded}


def saved_experts_exact(model, folder, policy=None) -> dict:
    """experts_exact for a saved packed folder: each expert's part of this rank against its
    part of the same expert of the folder loaded in one process (codes, scales, a codebook bit
    for bit; the weights kept apart by where they sit)."""
    whole, rank = load(folder), dist.get_rank()
    differ, sharded = [], 0
    for name, mod in model.named_modules():
        if not isinstance(mod, PackedExperts):
            continue
        sharded += 1
        ref = dict(whole.named_modules())[name]  # (the experts module shows its view by name)
        for e in range(mod.num_experts):
            got, want = mod.expert(e).q, ref.expert(e).q
            rows = None
            if got.shape[0] != want.shape[0]:
                rows = expert_rows(want.shape[0], got.shape[0], rank)
                codes, scales = want.codes[rows], want.scales[rows]
            else:
                codes, scales = my_part(want, got.shape, rank)
            same = [torch.equal(bits(got.codes), bits(codes)),
                    torch.equal(bits(got.scales), bits(scales)), set(got.side) == set(want.side),
                    same_map(apart_map(got), my_map(want, got, rows))]
            same += [torch.equal(bits(got.side[k]), bits(want.side[k]))
                     for k in want.fmt.whole_tensor_side]
            if not all(same):
                differ.append(f"{name}[{e}]")
    return {"differ": differ, "sharded": sharded}


def compare_exact(model, folder, policy, exact=shards_exact) -> dict:
    """compare, and ``exact`` (shards_exact or experts_exact) of every rank."""
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, exact(model, folder, policy))
    return {**compare(model, folder, policy), "exact": every}


def oracle(folder, policy):
    return qcompile.quantize_model_(AutoModelForCausalLM.from_pretrained(folder).eval(), policy)


def compare(model, folder, policy, only=None) -> dict:
    """The sharded model against the single-process one (the float ``folder`` quantised with
    ``policy``; a saved packed ``folder`` loaded as it is when ``policy`` is None): the largest
    logit difference relative to the largest logit, and this rank's packed bytes (of the layers
    named ``only``: those the plan shards, or all) and the whole model's."""
    got, mine = logits(model), packed_bytes(model, only)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if dist.get_rank() != 0:
        return {}
    ref = load(folder) if policy is None else oracle(folder, policy)
    want = logits(ref)
    return {"rel_err": ((got - want).abs().max() / want.abs().max()).item(),
            "rank_bytes": every, "whole_bytes": packed_bytes(ref, only)}


def load(folder, policy=None, **kwargs):
    if policy is not None:  # (quantization_config=None would drop a saved folder's own)
        kwargs["quantization_config"] = qcompile.BlockQuantConfig(policy)
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


def case(fn):
    try:
        return fn()
    except (ValueError, TypeError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


def plan(tp_plan: dict) -> dict:
    return {"distributed_config": DistributedConfig(tp_plan=tp_plan, tp_size=2)}


def main(folder, out):
    llama, llama64, gpt2, llama_bias, moe = (str(Path(folder) / n) for n in (
        "llama", "llama64", "gpt2", "llama_bias", "qwen3_moe"))
    auto, packed = {"tp_plan": "auto"}, str(Path(folder) / "llama_packed")
    packed64 = str(Path(folder) / "llama64_packed")
    results = {
        "llama_nf4": case(lambda: compare(load(llama, NF4, **auto), llama, NF4)),
        "llama_mixed": case(lambda: compare(load(llama, MIXED, **auto), llama, MIXED)),
        "llama_mixed_compiled": case(lambda: compare(
            qcompile.compile(load(llama, MIXED, **auto), MIXED, lowering="eager"), llama, MIXED)),
        "llama_quantize_model": case(lambda: compare(
            qcompile.quantize_model_(load(llama, **auto), NF4), llama, NF4)),
        "gpt2_lm_head": case(lambda: compare(load(gpt2, ALL_NF4, **plan(GPT2_PLAN)), gpt2,
                                             ALL_NF4, only=GPT2_PLAN)),
        "gpt2_conv1d": case(lambda: load(gpt2, ALL_NF4, **plan(CONV1D_PLAN))),
        "save_sharded": case(lambda: load(llama, NF4, **auto).save_pretrained(
            Path(folder) / f"resaved{dist.get_rank()}")),
        "saved_sharded": case(lambda: compare(load(packed, **auto), packed, None)),
        "saved_mixed_sharded": case(lambda: compare(load(packed + "_mixed", **auto),
                                                    packed + "_mixed", None)),
        "saved_proxy": case(lambda: compare_exact(load(packed + "_proxy", **auto),
                                                  packed + "_proxy", None, saved_shards_exact)),
        "saved_cut_blocks": case(lambda: load(packed64, **auto)),
        "cut_blocks": case(lambda: load(llama64, NF4, **auto)),
        "llama_nvfp4": case(lambda: compare_exact(load(llama, NVFP4, **auto), llama, NVFP4)),
        "llama_quantile4": case(lambda: compare_exact(load(llama, QUANTILE, **auto), llama,
                                                      QUANTILE)),
        "llama_whole_mixed": case(lambda: compare_exact(load(llama_bias, WHOLE_MIXED, **auto),
                                                        llama_bias, WHOLE_MIXED)),
        "llama_nvfp4_quantize_model": case(lambda: compare_exact(
            qcompile.quantize_model_(load(llama, **auto), NVFP4), llama, NVFP4)),
        "llama_proxy": case(lambda: compare_exact(load(llama, PROXY_MIXED, **auto), llama,
                                                  PROXY_MIXED)),
        "act_nvfp4_rowwise": case(lambda: load(llama, ACT_NVFP4, **auto)),
        "moe_nf4": case(lambda: compare(load(moe, MOE_NF4, **auto), moe, MOE_NF4)),
        "moe_quantize_model": case(lambda: compare(
            qcompile.quantize_model_(load(moe, **auto), MOE_NF4), moe, MOE_NF4)),
        "moe_cut_blocks": case(lambda: load(moe + "_cut", MOE_NF4, **auto)),
        "moe_whole": case(lambda: compare_exact(load(moe, MOE_WHOLE, **auto), moe, MOE_WHOLE,
                                                experts_exact)),
        "saved_moe": case(lambda: compare_exact(load(moe + "_packed", **auto), moe + "_packed",
                                                None, saved_experts_exact)),
        "saved_moe_cut_blocks": case(lambda: load(moe + "_cut_packed", **auto)),
        "compile_float": case(lambda: qcompile.compile(load(llama, **auto), NF4)),
    }
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(
            {k: v if isinstance(v, dict) else {"loaded": True} for k, v in results.items()}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
