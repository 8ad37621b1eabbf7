"""Tensor parallelism (docs/distributed.md): two ranks under ``torchrun --nproc-per-node 2``
(gloo, CPU) load tiny Llama and GPT-2 checkpoints with transformers' tp_plan and
BlockQuantConfig (tests/tp_worker.py); each sharded model gives the logits of the same model
quantised in one process, within float32 reordering (the row-parallel sums), holds about half
the packed bytes per rank, and every split blockquant cannot pack shard by shard is refused
with a message naming the layer and why. Saved packed folders load sharded the same way, equal
to the folder loaded in one process. Formats with side data describing the whole tensor (NVFP4's
tensor scale, quantile4's codebook) are packed with that side data computed across the ranks:
each rank's packed shard is bit for bit its slice of the weight packed whole in one process;
so is it for proxy formats, whose columns are chosen by the whole tensor's scores, and for saved
folders with proxy columns. A tiny Qwen3-MoE loads under its plan with its expert stacks split
like dense layers (checked per expert matrix), from the float checkpoint or a saved packed
folder (each expert's packed bytes cut), or is refused by name."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import qcompile
from qcompile import LayerSpec, Policy

HERE = Path(__file__).parent
BOUND = 1e-5  # relative to the largest logit: float32 sums reordered across 2 ranks
NF4 = Policy({"lm_head": None}, default=LayerSpec(weight="nf4"))  # as tests/tp_worker.py
# transformers 5.23's Qwen3-MoE plan splits the expert stacks; 5.25's leaves them whole (each
# rank holds every expert), so there is nothing to shard or refuse there
EXPERTS_SPLIT = any("experts" in k for k in transformers.Qwen3MoeConfig().base_model_tp_plan)
MOE_REFUSALS = ("moe_cut_blocks", "moe_quantize_model", "saved_moe_cut_blocks")
# saved packed, then loaded sharded: OPQ outliers cut by rows (gate, column-parallel) and by K
# (down, row-parallel), whole-tensor side data replicated (up: quantile codebook, column-
# parallel; o_proj: NVFP4's tensor scale, row-parallel), an activation format (q, k)
SAVED_MIXED = Policy({"lm_head": None, "*.mlp.[gd]*_proj": LayerSpec(weight="bof4s_opq"),
                      "*.mlp.up_proj": LayerSpec(weight="quantile4"),
                      "*.self_attn.o_proj": LayerSpec(weight="nvfp4"),
                      "re:.*self_attn\\.[qk]_proj": LayerSpec(weight="mxint8", act="mxint8")},
                     default=LayerSpec(weight="int4"))
# saved with proxy columns, loaded sharded: column-parallel (up_proj: every rank keeps every
# proxy column, for its rows) and row-parallel (down_proj with OPQ outliers, o_proj with a
# codebook and one proxy column, so one rank holds none: each proxy column goes to the rank
# holding its position)
PROXY = Policy({"*.mlp.up_proj": LayerSpec(weight="nf4[proxy=8]"),
                "*.mlp.down_proj": LayerSpec(weight="bof4s_opq[proxy=0.05]"),
                "*.self_attn.o_proj": LayerSpec(weight="quantile4[proxy=1]")})
# saved packed expert stacks, loaded sharded: gate_up cut by rows (packed_colwise: each rank's
# part of the gate half and of the up half) with OPQ outliers and a quantile codebook per
# expert (replicated), down_proj cut along K in whole blocks with its outliers
SAVED_MOE = Policy({"lm_head": None,
                    "*.experts.gate_up_proj": LayerSpec(weight="quantile4[opq=true]"),
                    "*.experts.down_proj": LayerSpec(weight="bof4s_opq")},
                   default=LayerSpec(weight="int4"))
LLAMA = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
             tie_word_embeddings=True)


def save(folder, model):
    model.save_pretrained(folder)
    return folder


def checkpoints(root: Path):
    torch.manual_seed(0)
    # hidden 128: the row-parallel halves (64 columns) start on nf4's / int4's blocks of 64
    save(root / "llama", transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, **LLAMA)))
    # hidden 64: o_proj's halves of 32 columns cut nf4's blocks of 64
    save(root / "llama64", transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, **LLAMA)))
    # biases on every projection: split with the rows (column-parallel) or added once (row-)
    biased = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, attention_bias=True, mlp_bias=True, **LLAMA))
    with torch.no_grad():  # (initialised to zeros)
        for name, p in biased.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    save(root / "llama_bias", biased)
    for name, policy, saved in (("llama", NF4, "llama_packed"), ("llama64", NF4, "llama64_packed"),
                                ("llama_bias", SAVED_MIXED, "llama_packed_mixed"),
                                ("llama", PROXY, "llama_packed_proxy")):
        transformers.LlamaForCausalLM.from_pretrained(
            root / name, quantization_config=qcompile.BlockQuantConfig(policy)).save_pretrained(
                root / saved)
    save(root / "gpt2", transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=64, n_head=2, vocab_size=128, n_positions=16,
        tie_word_embeddings=False)))
    # experts [4, 2I, 128] / [4, 128, I]: down_proj's halves of I = 128 start on nf4's blocks,
    # those of I = 96 (48 columns) cut them
    for name, inter in (("qwen3_moe", 128), ("qwen3_moe_cut", 96)):
        save(root / name, transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            hidden_size=128, intermediate_size=256, moe_intermediate_size=inter, num_experts=4,
            num_experts_per_tok=2, head_dim=32, **LLAMA)))
    for name, policy, saved in (("qwen3_moe", SAVED_MOE, "qwen3_moe_packed"),
                                ("qwen3_moe_cut", NF4, "qwen3_moe_cut_packed")):
        transformers.Qwen3MoeForCausalLM.from_pretrained(
            root / name, quantization_config=qcompile.BlockQuantConfig(policy)).save_pretrained(
                root / saved)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    checkpoints(root)
    out = root / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         "--nproc-per-node", "2", str(HERE / "tp_worker.py"), str(root), str(out)],
        capture_output=True, text=True, timeout=240, env=env, cwd=HERE.parent)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", ["llama_nf4", "llama_mixed", "llama_mixed_compiled",
                                  "llama_quantize_model", "gpt2_lm_head", "saved_sharded",
                                  "saved_mixed_sharded"])
def test_sharded_logits_equal_one_process(results, case):
    got = results[case]
    assert "error" not in got, got
    assert got["rel_err"] <= BOUND, got
    # each rank holds its half of every sharded packed weight, never the whole (GPT-2: lm_head,
    # the only layer its plan shards)
    assert len(got["rank_bytes"]) == 2
    assert all(b <= 0.55 * got["whole_bytes"] for b in got["rank_bytes"]), got


@pytest.mark.parametrize("case", ["llama_nvfp4", "llama_quantile4", "llama_whole_mixed",
                                  "llama_nvfp4_quantize_model"])
def test_whole_tensor_side_data_is_computed_across_ranks(results, case):
    """NVFP4's tensor scale and a quantile codebook, packed shard by shard: each rank's packed
    shard is bit for bit its part of the weight packed whole in one process (tensor scale and
    codebook those of the whole tensor), and the logits those of one process."""
    got = results[case]
    assert "error" not in got, got
    assert got["rel_err"] <= BOUND, got
    for rank in got["exact"]:
        assert rank["sharded"] == 2 * 7 and rank["differ"] == [], got["exact"]


def test_proxy_columns_are_the_whole_tensors(results):
    """Proxy formats under the plan (column- and row-parallel layers, with a quantile codebook
    and OPQ outliers beside them): the columns are chosen by the whole tensor's scores,
    computed across the ranks, and each rank keeps those it holds, so each rank's packed shard
    is bit for bit its slice of the one-process packing (lm_head too: its vocabulary split)."""
    got = results["llama_proxy"]
    assert "error" not in got, got
    assert got["rel_err"] <= BOUND, got
    for rank in got["exact"]:
        assert rank["sharded"] == 2 * 7 + 1 and rank["differ"] == [], got["exact"]


@pytest.mark.parametrize("case", ["moe_nf4", "moe_whole"])
def test_sharded_experts_equal_one_process(results, case):
    """Qwen3-MoE under its tp_plan: gate_up_proj split by rows (packed_colwise), down_proj by
    whole blocks of its reduction axis (rowwise), partial outputs summed (moe_tp_experts);
    moe_whole: each expert's NVFP4 tensor scale (gate_up) and quantile codebook (down) computed
    across ranks, every expert's packed part bit for bit its part of one process's packing."""
    got = results[case]
    assert "error" not in got, got
    assert got["rel_err"] <= BOUND, got
    if not EXPERTS_SPLIT:  # whole stacks on each rank, the attention still split
        assert all(b <= got["whole_bytes"] for b in got["rank_bytes"]), got
        return
    assert all(b <= 0.55 * got["whole_bytes"] for b in got["rank_bytes"]), got
    for rank in got.get("exact", []):
        assert rank["sharded"] == 2 * 2 and rank["differ"] == [], got["exact"]


def test_saved_proxy_columns_go_to_their_rank(results):
    """A folder saved with proxy columns (column- and row-parallel layers, with OPQ outliers
    and a codebook beside them) loaded under the plan: each rank's packed shard is bit for bit
    its part of the folder's packed weight loaded in one process, and the logits equal."""
    got = results["saved_proxy"]
    assert "error" not in got, got
    assert got["rel_err"] <= BOUND, got
    for rank in got["exact"]:
        assert rank["sharded"] == 2 * 3 and rank["differ"] == [], got["exact"]


def test_saved_experts_load_sharded(results):
    """A saved packed Qwen3-MoE loaded under its plan: each rank's expert stacks are its part of
    the saved ones (gate_up's rows, down_proj's whole blocks of K; codes, scales, outliers and
    codebooks bit for bit), cut from the packed bytes, and the logits those of the folder loaded
    in one process."""
    got = results["saved_moe"]
    assert "error" not in got, got
    assert got["rel_err"] <= BOUND, got
    if not EXPERTS_SPLIT:  # whole stacks on each rank (transformers 5.25's plan)
        assert all(b <= got["whole_bytes"] for b in got["rank_bytes"]), got
        return
    assert all(b <= 0.55 * got["whole_bytes"] for b in got["rank_bytes"]), got
    for rank in got["exact"]:
        assert rank["sharded"] == 2 * 2 and rank["differ"] == [], got["exact"]


@pytest.mark.parametrize("case, words", [
    ("cut_blocks", ["row-parallel split of layer 'model.layers.0.self_attn.o_proj'",
                    "K=[32]", "cuts weight blocks of 64"]),
    ("act_nvfp4_rowwise", ["row-parallel split", "'model.layers.0.self_attn.o_proj'",
                           "input format", "whole tensor (tensor_scale)"]),
    ("moe_cut_blocks", ["'model.layers.0.mlp.experts.down_proj' (nf4, weight [4, 128, 96])",
                        "K=[48]", "cuts weight blocks of 64"]),
    ("moe_quantize_model", ["expert stack 'model.layers.0.mlp.experts.gate_up_proj' is a float "
                            "DTensor", "BlockQuantConfig(policy)"]),
    ("saved_moe_cut_blocks", ["row-parallel split of saved packed expert stack "
                              "'model.layers.0.mlp.experts.down_proj' (nf4, 4 experts of "
                              "[128, 96])", "K=[48]", "cuts weight blocks of 64"]),
    ("compile_float", ["'model.layers.0.self_attn.q_proj' holds a float DTensor weight",
                       "quantize_model_"]),
    ("gpt2_conv1d", ["out_features"]),  # transformers cannot shard GPT-2's Conv1D at all
    ("save_sharded", ["saving a tensor-parallel quantised model is not supported",
                      "holds only this rank's shard"]),
    ("saved_cut_blocks", ["row-parallel split of layer 'model.layers.0.self_attn.o_proj'",
                          "K=[32]", "cuts weight blocks of 64"]),
])
def test_unsupported_split_refused(results, case, words):
    if case in MOE_REFUSALS and not EXPERTS_SPLIT:  # no split of the experts: nothing refused
        assert "error" not in results[case], (case, results[case])
        return
    error = results[case].get("error", "")
    assert error.startswith("ValueError"), (case, results[case])
    for w in words:
        assert w in error, (w, error)
