"""Mistral recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a converted
checkpoint): the architecture is then read from it, whatever the sizes below say."""

from megabridge.models.config import ModelConfig
from megabridge.recipes import as_lora, finetune, tiny_pretrain


def _mistral(layers, hidden, ffn, heads, groups, vocab, theta=1e6, window=None):
    return ModelConfig(
        family="mistral", num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
        num_attention_heads=heads, num_query_groups=groups, vocab_size=vocab, seq_length=4096,
        normalization="RMSNorm", activation="swiglu", position_embedding_type="rope",
        rotary_base=theta, layernorm_epsilon=1e-5, sliding_window=window,
    )  # fmt: skip


def mistral_tiny_pretrain_config():
    """A tiny Mistral-shaped model with a 32-token sliding window on mock data (tests, smoke runs)."""
    return tiny_pretrain("mistral_tiny", _mistral(2, 64, 128, 4, 2, 256, theta=1e4, window=32))


def mistral_7b_finetune_config():
    """SFT of Mistral 7B v0.3 (TP=2): set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = finetune("mistral_7b_sft", _mistral(32, 4096, 14336, 32, 8, 32768))
    cfg.model.tensor_model_parallel_size = 2
    return cfg


def mistral_7b_lora_config():
    """LoRA of Mistral 7B v0.3 on one GPU: set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = as_lora(mistral_7b_finetune_config(), "mistral_7b_lora")
    cfg.model.tensor_model_parallel_size = 1  # frozen weights and adapters fit one GPU
    return cfg
