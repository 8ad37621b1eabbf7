"""The ranks of tests/test_search_distributed.py: run under ``torchrun --nproc-per-node 2``
(gloo, CPU) as ``search_worker.py OUT.json``. Every rank runs the same search of a tiny random
Llama, counting the model's forward calls; rank 0 writes {case: [per-rank summary]}. The test
imports ``model``, ``search`` and ``summary`` to run the same search in one plain process."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

sys.path.insert(0, str(Path(__file__).parent))
import qcompile  # noqa: E402
from qcompile import LayerSpec  # noqa: E402

CANDIDATES = ["nf4", "mxfp4", "int4[block_size=32]", LayerSpec(weight="mxint8", act="mxint8"),
              None]
BITS = (4.6, 6)  # the search, then another budget solved from its sensitivities


def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def calibration(seed=1):
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))


def search(m, ids, bits, sensitivities=None) -> dict:
    """The search's summary and the number of forward calls of the model it made."""
    calls = []
    hook = m.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        r = qcompile.search_policy(m, ids, bits=bits, candidates=CANDIDATES, progress=False,
                                   sensitivities=sensitivities)
    finally:
        hook.remove()
    return {**summary(r), "forwards": len(calls)}, r


def summary(r) -> dict:
    """Every number of the result (floats exactly, through JSON) and the pass counts."""
    s = r.sensitivities
    return {"policy": r.policy.to_python(), "bits": r.bits, "kl": r.kl, "top1": r.top1,
            "estimated_kl": r.estimated_kl, "uniform": r.uniform, "note": r.note,
            "refinement": r.refinement,
            "table": [[t.name, t.choice, t.sensitivity, t.bits, t.numel] for t in r.table],
            "sensitivities": s.kl.tolist(), "cost": s.cost, "passes": s.passes,
            "passes_by_rank": s.passes_by_rank}


def refused(fn) -> dict:
    try:
        fn()
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


def main(out):
    rank = dist.get_rank()
    m = model()
    first, result = search(m, calibration(), BITS[0])
    again, _ = search(m, calibration(), BITS[1], result.sensitivities)
    other_ids = refused(lambda: search(m, calibration(seed=1 + rank), BITS[0]))
    if rank == 1:
        with torch.no_grad():
            m.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    other_weights = refused(lambda: search(m, calibration(), BITS[0]))
    cases = {"search": first, "other_budget": again, "other_calibration": other_ids,
             "other_weights": other_weights}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, cases)
    if rank == 0:
        Path(out).write_text(json.dumps({k: [c[k] for c in every] for k in cases}))


if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        main(sys.argv[1])
    finally:
        dist.destroy_process_group()
