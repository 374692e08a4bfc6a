"""Gemma 3 (text) recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a
converted checkpoint): the architecture is then read from it, whatever the sizes below say.

google/gemma-3-1b-* is a Gemma3ForCausalLM; the 4B and larger Hub checkpoints are
Gemma3ForConditionalGeneration (text + vision): they are read as their language model (the
vision tower left out) and export as a text-only Gemma3ForCausalLM."""

from megabridge.models.gemma3.bridge import Gemma3Bridge
from megabridge.recipes import as_lora, finetune, sized, tiny_finetune, tiny_pretrain

# Every 6th layer global, the others sliding-window (transformers' default layer_types);
# RoPE theta 1M on the global layers, 10k on the local ones.
_GEMMA3 = dict(vocab_size=262208, rms_norm_eps=1e-6, rope_theta=1e6, rope_local_base_freq=1e4,
               sliding_window=1024, head_dim=256, query_pre_attn_scalar=256,
               tie_word_embeddings=True)  # fmt: skip
_LINEAR_8 = {"rope_type": "linear", "factor": 8.0}  # the global layers of 4B and up
# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    "gemma3_1b": dict(_GEMMA3, num_hidden_layers=26, hidden_size=1152, intermediate_size=6912,
                      num_attention_heads=4, num_key_value_heads=1, vocab_size=262144,
                      sliding_window=512),
    "gemma3_4b": dict(_GEMMA3, num_hidden_layers=34, hidden_size=2560, intermediate_size=10240,
                      num_attention_heads=8, num_key_value_heads=4, rope_scaling=_LINEAR_8),
    "gemma3_12b": dict(_GEMMA3, num_hidden_layers=48, hidden_size=3840, intermediate_size=15360,
                       num_attention_heads=16, num_key_value_heads=8, rope_scaling=_LINEAR_8),
    # 27B: head_dim 128, scores scaled by (hidden / heads)**-0.5 = 168**-0.5.
    "gemma3_27b": dict(_GEMMA3, num_hidden_layers=62, hidden_size=5376, intermediate_size=21504,
                       num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                       query_pre_attn_scalar=168, rope_scaling=_LINEAR_8),
}  # fmt: skip
_LOCAL, _GLOBAL = "sliding_attention", "full_attention"
TINY = dict(_GEMMA3, num_hidden_layers=4, hidden_size=64, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20,
            vocab_size=256, sliding_window=8,
            layer_types=[_LOCAL, _GLOBAL, _LOCAL, _LOCAL])  # fmt: skip


def gemma3_tiny_pretrain_config():
    """A tiny Gemma 3-shaped model on mock data (tests, smoke runs)."""
    return tiny_pretrain("gemma3_tiny", sized(Gemma3Bridge, TINY))


def gemma3_tiny_finetune_config():
    """SFT of a tiny Gemma 3 from checkpoint.pretrained_checkpoint (tests, smoke runs)."""
    return tiny_finetune("gemma3_tiny_sft", gemma3_tiny_pretrain_config().model)


def gemma3_1b_finetune_config():
    """SFT of Gemma 3 1B: set checkpoint.pretrained_checkpoint and dataset.path."""
    return finetune("gemma3_1b_sft", sized(Gemma3Bridge, SIZES["gemma3_1b"]))


def gemma3_1b_lora_config():
    """LoRA of Gemma 3 1B: set checkpoint.pretrained_checkpoint and dataset.path."""
    return as_lora(gemma3_1b_finetune_config(), "gemma3_1b_lora")


def gemma3_4b_finetune_config():
    """SFT of Gemma 3 4B text: set checkpoint.pretrained_checkpoint and dataset.path."""
    return finetune("gemma3_4b_sft", sized(Gemma3Bridge, SIZES["gemma3_4b"]))


def gemma3_4b_lora_config():
    """LoRA of Gemma 3 4B text: set checkpoint.pretrained_checkpoint and dataset.path."""
    return as_lora(gemma3_4b_finetune_config(), "gemma3_4b_lora")


def gemma3_12b_finetune_config():
    """SFT of Gemma 3 12B text (TP=4): set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = finetune("gemma3_12b_sft", sized(Gemma3Bridge, SIZES["gemma3_12b"]))
    cfg.model.tensor_model_parallel_size = 4
    return cfg


def gemma3_27b_finetune_config():
    """SFT of Gemma 3 27B text (TP=8): set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = finetune("gemma3_27b_sft", sized(Gemma3Bridge, SIZES["gemma3_27b"]))
    cfg.model.tensor_model_parallel_size = 8
    return cfg
