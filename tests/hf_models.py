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
        # Saved buffers too (DeepSeek-V3's e_score_correction_bias): zeros would hide them.
        params = dict(model.named_parameters())
        for name, t in model.state_dict().items():
            if name not in params and t.is_floating_point():
                t.copy_(0.05 * torch.randn(t.shape, generator=gen))


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


def tiny_gemma2_config(**overrides):
    """2 layers: sliding window then global; window and soft-caps small enough to bite."""
    from transformers import Gemma2Config

    kwargs = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # not hidden / heads
        query_pre_attn_scalar=20,  # not head_dim
        sliding_window=8,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        architectures=["Gemma2ForCausalLM"],
    )
    kwargs.update(overrides)
    return Gemma2Config(**kwargs)


def tiny_gemma3_config(**overrides):
    """4 layers, the second global; local and global RoPE differ (theta, linear scaling)."""
    from transformers import Gemma3TextConfig

    kwargs = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        query_pre_attn_scalar=20,
        sliding_window=8,
        layer_types=[
            "sliding_attention",
            "full_attention",
            "sliding_attention",
            "sliding_attention",
        ],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
        },
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        architectures=["Gemma3ForCausalLM"],
    )
    kwargs.update(overrides)
    return Gemma3TextConfig(**kwargs)


# MoE families: 4 experts, top-2, small enough that two CPU processes run them in seconds.
_TINY_MOE = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    num_experts_per_tok=2,
)


def tiny_mixtral_config(**overrides):
    from transformers import MixtralConfig

    kwargs = dict(
        _TINY_MOE, intermediate_size=32, num_local_experts=4, architectures=["MixtralForCausalLM"]
    )
    kwargs.update(overrides)
    return MixtralConfig(**kwargs)


def tiny_qwen2_moe_config(**overrides):
    """Layer 0 dense (decoder_sparse_step=2), layer 1 MoE with a gated shared expert."""
    from transformers import Qwen2MoeConfig

    kwargs = dict(
        _TINY_MOE, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=4, decoder_sparse_step=2,
        norm_topk_prob=False, architectures=["Qwen2MoeForCausalLM"],
    )  # fmt: skip
    kwargs.update(overrides)
    return Qwen2MoeConfig(**kwargs)


def tiny_qwen3_moe_config(**overrides):
    from transformers import Qwen3MoeConfig

    kwargs = dict(
        _TINY_MOE, intermediate_size=96, moe_intermediate_size=32, num_experts=4, head_dim=32,
        norm_topk_prob=True, architectures=["Qwen3MoeForCausalLM"],
    )  # fmt: skip
    kwargs.update(overrides)
    return Qwen3MoeConfig(**kwargs)


def tiny_deepseek_v3_config(**overrides):
    """Layer 0 dense, layers 1-2 MoE: 4 experts in 2 groups (1 chosen), top-2, a shared expert."""
    from transformers import DeepseekV3Config

    kwargs = dict(
        _TINY_MOE, num_hidden_layers=3, num_key_value_heads=4, intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, n_group=2,
        topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=32,
        rms_norm_eps=1e-6,  # transformers' latent norms always use 1e-6
        kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        architectures=["DeepseekV3ForCausalLM"],
    )  # fmt: skip
    kwargs.update(overrides)
    return DeepseekV3Config(**kwargs)
