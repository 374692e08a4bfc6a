"""Phi-3 recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a converted
checkpoint): the architecture is then read from it, whatever the sizes below say."""

from megabridge.models.config import ModelConfig
from megabridge.recipes import as_lora, finetune, tiny_pretrain


def _phi3(layers, hidden, ffn, heads, vocab, window):
    return ModelConfig(
        family="phi3", num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
        num_attention_heads=heads, num_query_groups=heads, vocab_size=vocab, seq_length=4096,
        normalization="RMSNorm", activation="swiglu", position_embedding_type="rope",
        rotary_base=10000.0, layernorm_epsilon=1e-5, sliding_window=window,
    )  # fmt: skip


def phi3_tiny_pretrain_config():
    """A tiny Phi-3-shaped model on mock data (tests, smoke runs)."""
    return tiny_pretrain("phi3_tiny", _phi3(2, 64, 128, 4, 256, window=None))


def phi3_mini_finetune_config():
    """SFT of Phi-3-mini-4k (2047-token window): set checkpoint.pretrained_checkpoint and dataset.path."""
    return finetune("phi3_mini_sft", _phi3(32, 3072, 8192, 32, 32064, window=2047))


def phi3_mini_lora_config():
    """LoRA of Phi-3-mini-4k: set checkpoint.pretrained_checkpoint and dataset.path."""
    return as_lora(phi3_mini_finetune_config(), "phi3_mini_lora")
