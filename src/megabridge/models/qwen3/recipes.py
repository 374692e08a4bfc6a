"""Qwen3 (dense) recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a
converted checkpoint): the architecture is then read from it, whatever the sizes below say."""

from megabridge.models.qwen3.bridge import Qwen3Bridge
from megabridge.recipes import as_lora, finetune, sized, tiny_pretrain

_QWEN3 = dict(num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
              rope_theta=1e6)  # fmt: skip
# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    "qwen3_600m": dict(_QWEN3, num_hidden_layers=28, hidden_size=1024, intermediate_size=3072,
                       num_attention_heads=16, tie_word_embeddings=True),
    "qwen3_8b": dict(_QWEN3, num_hidden_layers=36, hidden_size=4096, intermediate_size=12288,
                     num_attention_heads=32, tie_word_embeddings=False),
}  # fmt: skip
TINY = dict(_QWEN3, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=256,
            rope_theta=1e4, tie_word_embeddings=False)  # fmt: skip


def qwen3_tiny_pretrain_config():
    """A tiny Qwen3-shaped model on mock data (tests, smoke runs)."""
    return tiny_pretrain("qwen3_tiny", sized(Qwen3Bridge, TINY))


def qwen3_600m_finetune_config():
    """SFT of Qwen3 0.6B (tied embeddings): set checkpoint.pretrained_checkpoint and dataset.path."""
    return finetune("qwen3_600m_sft", sized(Qwen3Bridge, SIZES["qwen3_600m"]))


def qwen3_8b_finetune_config():
    """SFT of Qwen3 8B (TP=2): set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = finetune("qwen3_8b_sft", sized(Qwen3Bridge, SIZES["qwen3_8b"]))
    cfg.model.tensor_model_parallel_size = 2
    return cfg


def qwen3_8b_lora_config():
    """LoRA of Qwen3 8B on one GPU: set checkpoint.pretrained_checkpoint and dataset.path."""
    return as_lora(qwen3_8b_finetune_config(), "qwen3_8b_lora")
