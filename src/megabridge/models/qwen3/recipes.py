"""Qwen3 (dense) recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a
converted checkpoint): the architecture is then read from it, whatever the sizes below say."""

from megabridge.models.config import ModelConfig
from megabridge.recipes import as_lora, finetune, tiny_pretrain


def _qwen3(layers, hidden, ffn, heads, groups, vocab, tied, head_dim=128, theta=1e6):
    return ModelConfig(
        family="qwen3", num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
        num_attention_heads=heads, num_query_groups=groups, kv_channels=head_dim,
        vocab_size=vocab, seq_length=4096, normalization="RMSNorm", activation="swiglu",
        position_embedding_type="rope", qk_layernorm=True, rotary_base=theta,
        layernorm_epsilon=1e-6, share_embeddings_and_output_weights=tied,
    )  # fmt: skip


def qwen3_tiny_pretrain_config():
    """A tiny Qwen3-shaped model on mock data (tests, smoke runs)."""
    model = _qwen3(2, 64, 128, 4, 2, 256, tied=False, head_dim=32, theta=1e4)
    return tiny_pretrain("qwen3_tiny", model)


def qwen3_600m_finetune_config():
    """SFT of Qwen3 0.6B (tied embeddings): set checkpoint.pretrained_checkpoint and dataset.path."""
    return finetune("qwen3_600m_sft", _qwen3(28, 1024, 3072, 16, 8, 151936, tied=True))


def qwen3_8b_finetune_config():
    """SFT of Qwen3 8B (TP=2): set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = finetune("qwen3_8b_sft", _qwen3(36, 4096, 12288, 32, 8, 151936, tied=False))
    cfg.model.tensor_model_parallel_size = 2
    return cfg


def qwen3_8b_lora_config():
    """LoRA of Qwen3 8B on one GPU: set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = as_lora(qwen3_8b_finetune_config(), "qwen3_8b_lora")
    cfg.model.tensor_model_parallel_size = 1  # frozen weights and adapters fit one GPU
    return cfg
