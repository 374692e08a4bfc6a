"""Gemma 2 recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a converted
checkpoint): the architecture is then read from it, whatever the sizes below say."""

from megabridge.models.gemma2.bridge import Gemma2Bridge
from megabridge.recipes import as_lora, finetune, sized, tiny_finetune, tiny_pretrain

# Layers alternate sliding-window (even) and global (odd): transformers' default layer_types.
_GEMMA2 = dict(vocab_size=256000, rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=4096,
               attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
               tie_word_embeddings=True)  # fmt: skip
# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    "gemma2_2b": dict(_GEMMA2, num_hidden_layers=26, hidden_size=2304, intermediate_size=9216,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                      query_pre_attn_scalar=256),
    "gemma2_9b": dict(_GEMMA2, num_hidden_layers=42, hidden_size=3584, intermediate_size=14336,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                      query_pre_attn_scalar=256),
    # 27B scales scores by (hidden / heads)**-0.5 = 144**-0.5, not head_dim**-0.5.
    "gemma2_27b": dict(_GEMMA2, num_hidden_layers=46, hidden_size=4608, intermediate_size=36864,
                       num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                       query_pre_attn_scalar=144),
}  # fmt: skip
TINY = dict(_GEMMA2, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20,
            vocab_size=256, sliding_window=8)  # fmt: skip


def gemma2_tiny_pretrain_config():
    """A tiny Gemma 2-shaped model on mock data (tests, smoke runs)."""
    return tiny_pretrain("gemma2_tiny", sized(Gemma2Bridge, TINY))


def gemma2_tiny_finetune_config():
    """SFT of a tiny Gemma 2 from checkpoint.pretrained_checkpoint (tests, smoke runs)."""
    return tiny_finetune("gemma2_tiny_sft", gemma2_tiny_pretrain_config().model)


def gemma2_2b_finetune_config():
    """SFT of Gemma 2 2B: set checkpoint.pretrained_checkpoint and dataset.path."""
    return finetune("gemma2_2b_sft", sized(Gemma2Bridge, SIZES["gemma2_2b"]))


def gemma2_2b_lora_config():
    """LoRA of Gemma 2 2B: set checkpoint.pretrained_checkpoint and dataset.path."""
    return as_lora(gemma2_2b_finetune_config(), "gemma2_2b_lora")


def gemma2_9b_finetune_config():
    """SFT of Gemma 2 9B (TP=2 by default): set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = finetune("gemma2_9b_sft", sized(Gemma2Bridge, SIZES["gemma2_9b"]))
    cfg.model.tensor_model_parallel_size = 2
    return cfg


def gemma2_9b_lora_config():
    """LoRA of Gemma 2 9B on one GPU: set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = as_lora(gemma2_9b_finetune_config(), "gemma2_9b_lora")
    cfg.model.tensor_model_parallel_size = 1
    return cfg


def gemma2_27b_finetune_config():
    """SFT of Gemma 2 27B (TP=8): set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = finetune("gemma2_27b_sft", sized(Gemma2Bridge, SIZES["gemma2_27b"]))
    cfg.model.tensor_model_parallel_size = 8
    return cfg
