"""Tiny HF models built from transformers' own config classes, random weights, saved locally."""

from __future__ import annotations

from pathlib import Path

import torch


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere, norms included (ones would hide a missing norm mapping)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def save_tiny(config, path: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    randomize(model, seed)
    model.to(dtype).save_pretrained(str(path))
    return Path(path)


# Two layers, GQA with 2 key/value heads, even vocab: every family's tiny shape.
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def _tiny(config_class: str, architecture: str, overrides: dict, **family_defaults):
    import transformers

    kwargs = {**TINY, "architectures": [architecture], **family_defaults, **overrides}
    return getattr(transformers, config_class)(**kwargs)


def tiny_llama_config(**overrides):
    return _tiny("LlamaConfig", "LlamaForCausalLM", overrides)


def tiny_qwen2_config(**overrides):
    return _tiny("Qwen2Config", "Qwen2ForCausalLM", overrides)


def tiny_qwen3_config(**overrides):
    # heads * head_dim (128) != hidden_size (64), as in Qwen3-0.6B
    return _tiny("Qwen3Config", "Qwen3ForCausalLM", overrides, head_dim=32)


def tiny_mistral_config(**overrides):
    # MistralConfig's default sliding_window is 4096: off unless a test asks.
    return _tiny("MistralConfig", "MistralForCausalLM", overrides, sliding_window=None)


def tiny_phi3_config(**overrides):
    # Phi3Config's default pad/eos ids (32000) lie outside a tiny vocabulary.
    return _tiny("Phi3Config", "Phi3ForCausalLM", overrides, pad_token_id=0, eos_token_id=1)


def tiny_olmo2_config(**overrides):
    return _tiny("Olmo2Config", "Olmo2ForCausalLM", overrides, eos_token_id=1)
