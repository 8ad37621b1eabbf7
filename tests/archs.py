"""The tiny models of the architectures a user brings, shared by the model, CPU-kernel,
reliability and embedding tests (test modules do not import each other)."""
import re

import torch
import transformers

T = transformers


def _decoder(cfg_cls, model_cls, **kw):
    cfg = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
               bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg.update(kw)
    return lambda: model_cls(cfg_cls(**cfg))


# name -> (builder, lm head name, decoder layers prefix, regex of layer 1's MLP linears)
ARCHS = {
    "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0,
        eos_token_id=0)), "lm_head", "transformer.h", r"mlp\..*"),
    "bert": (lambda: T.BertForMaskedLM(T.BertConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2,
        vocab_size=128, max_position_embeddings=64)), "cls.predictions.decoder",
        "bert.encoder.layer", r"(intermediate|output)\.dense"),
    "llama": (_decoder(T.LlamaConfig, T.LlamaForCausalLM, tie_word_embeddings=False),
              "lm_head", "model.layers", r"mlp\..*"),
    "llama-tied": (_decoder(T.LlamaConfig, T.LlamaForCausalLM, tie_word_embeddings=True),
                   "lm_head", "model.layers", r"mlp\..*"),
    "qwen2": (_decoder(T.Qwen2Config, T.Qwen2ForCausalLM), "lm_head", "model.layers", r"mlp\..*"),
    "mistral": (_decoder(T.MistralConfig, T.MistralForCausalLM), "lm_head", "model.layers",
                r"mlp\..*"),
    "gemma3": (_decoder(T.Gemma3TextConfig, T.Gemma3ForCausalLM, head_dim=16, sliding_window=16),
               "lm_head", "model.layers", r"mlp\..*"),
    "phi3": (_decoder(T.Phi3Config, T.Phi3ForCausalLM), "lm_head", "model.layers", r"mlp\..*"),
    "opt": (lambda: T.OPTForCausalLM(T.OPTConfig(
        num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4, vocab_size=128,
        max_position_embeddings=64, word_embed_proj_dim=64, bos_token_id=0, eos_token_id=0,
        pad_token_id=1)), "lm_head", "model.decoder.layers", r"fc[12]"),
}
CAUSAL = [a for a in ARCHS if a != "bert"]


def build(arch, dtype=torch.float32):
    torch.manual_seed(0)
    return ARCHS[arch][0]().to(dtype).eval()


def rules_for(arch, weight_only=False):
    _, head, layers, mlp = ARCHS[arch]
    act = None if weight_only else "mxint8"
    rules = [(head, ("int8", None)),
             (f"{layers}.0.*", ("mxint8", act)),
             (f"re:{re.escape(layers)}\\.1\\.{mlp}", ("int4[block_size=32]", None)),
             (f"{layers}.1.*", None)]
    return rules, ("nf4", None)


def batch(arch, n=7):
    """Two sequences, the second one padded (left for decoders, right for BERT)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 128, (2, n), generator=g)
    mask = torch.ones(2, n, dtype=torch.long)
    if arch == "bert":
        mask[1, -3:] = 0
    else:
        mask[1, :3] = 0
    return ids, mask


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def small_llama(tied=False, seed=0):
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=64, tie_word_embeddings=tied,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return T.LlamaForCausalLM(cfg).eval()
