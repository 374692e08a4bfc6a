"""Qwen2 / Qwen2.5 recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a
converted checkpoint): the architecture is then read from it, whatever the sizes below say."""

from megabridge.models.config import ModelConfig
from megabridge.recipes import as_lora, finetune, tiny_pretrain


def _qwen2(layers, hidden, ffn, heads, groups, vocab, tied, theta=1e6):
    return ModelConfig(
        family="qwen2", num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
        num_attention_heads=heads, num_query_groups=groups, vocab_size=vocab, seq_length=4096,
        normalization="RMSNorm", activation="swiglu", position_embedding_type="rope",
        add_qkv_bias=True, rotary_base=theta, layernorm_epsilon=1e-6,
        share_embeddings_and_output_weights=tied,
    )  # fmt: skip


def qwen2_tiny_pretrain_config():
    """A tiny Qwen2-shaped model on mock data (tests, smoke runs)."""
    return tiny_pretrain("qwen2_tiny", _qwen2(2, 64, 128, 4, 2, 256, tied=True, theta=1e4))


def qwen25_500m_finetune_config():
    """SFT of Qwen2.5 0.5B (tied embeddings): set checkpoint.pretrained_checkpoint and dataset.path."""
    return finetune("qwen25_500m_sft", _qwen2(24, 896, 4864, 14, 2, 151936, tied=True))


def qwen25_7b_finetune_config():
    """SFT of Qwen2.5 7B (TP=2): set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = finetune("qwen25_7b_sft", _qwen2(28, 3584, 18944, 28, 4, 152064, tied=False))
    cfg.model.tensor_model_parallel_size = 2
    return cfg


def qwen25_7b_lora_config():
    """LoRA of Qwen2.5 7B on one GPU: set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = as_lora(qwen25_7b_finetune_config(), "qwen25_7b_lora")
    cfg.model.tensor_model_parallel_size = 1  # frozen weights and adapters fit one GPU
    return cfg
