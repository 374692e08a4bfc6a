"""Qwen2 / Qwen2.5 recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a
converted checkpoint): the architecture is then read from it, whatever the sizes below say."""

from megabridge.models.qwen2.bridge import Qwen2Bridge
from megabridge.recipes import as_lora, finetune, sized, tiny_pretrain

_QWEN25 = dict(vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6)
# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    "qwen25_500m": dict(_QWEN25, num_hidden_layers=24, hidden_size=896, intermediate_size=4864,
                        num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen25_7b": dict(_QWEN25, num_hidden_layers=28, hidden_size=3584, intermediate_size=18944,
                      num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                      tie_word_embeddings=False),
}  # fmt: skip
TINY = dict(_QWEN25, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=256, rope_theta=1e4,
            tie_word_embeddings=True)  # fmt: skip


def qwen2_tiny_pretrain_config():
    """A tiny Qwen2-shaped model on mock data (tests, smoke runs)."""
    return tiny_pretrain("qwen2_tiny", sized(Qwen2Bridge, TINY))


def qwen25_500m_finetune_config():
    """SFT of Qwen2.5 0.5B (tied embeddings): set checkpoint.pretrained_checkpoint and dataset.path."""
    return finetune("qwen25_500m_sft", sized(Qwen2Bridge, SIZES["qwen25_500m"]))


def qwen25_7b_finetune_config():
    """SFT of Qwen2.5 7B (TP=2): set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = finetune("qwen25_7b_sft", sized(Qwen2Bridge, SIZES["qwen25_7b"]))
    cfg.model.tensor_model_parallel_size = 2
    return cfg


def qwen25_7b_lora_config():
    """LoRA of Qwen2.5 7B on one GPU: set checkpoint.pretrained_checkpoint and dataset.path."""
    return as_lora(qwen25_7b_finetune_config(), "qwen25_7b_lora")
