"""Granite 3 (dense) recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a
converted checkpoint): the architecture is then read from it, whatever the sizes below say."""

from megabridge.models.granite.bridge import GraniteBridge
from megabridge.recipes import as_lora, finetune, sized, tiny_finetune, tiny_pretrain

_GRANITE31 = dict(num_hidden_layers=40, num_key_value_heads=8, vocab_size=49155,
                  max_position_embeddings=131072, rms_norm_eps=1e-5, embedding_multiplier=12.0,
                  residual_multiplier=0.22, tie_word_embeddings=True)  # fmt: skip
# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    "granite31_2b": dict(_GRANITE31, hidden_size=2048, intermediate_size=8192,
                         num_attention_heads=32, attention_multiplier=0.015625,
                         logits_scaling=8.0, rope_theta=5000000.0),
    "granite31_8b": dict(_GRANITE31, hidden_size=4096, intermediate_size=12800,
                         num_attention_heads=32, attention_multiplier=0.0078125,
                         logits_scaling=16.0, rope_theta=10000000.0),
}  # fmt: skip
TINY = dict(_GRANITE31, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
            attention_multiplier=0.0625, logits_scaling=8.0)  # fmt: skip


def granite_tiny_pretrain_config():
    """A tiny Granite-shaped model on mock data (tests, smoke runs)."""
    return tiny_pretrain("granite_tiny", sized(GraniteBridge, TINY))


def granite_tiny_finetune_config():
    """SFT of a tiny Granite from checkpoint.pretrained_checkpoint (tests, smoke runs)."""
    return tiny_finetune("granite_tiny_sft", granite_tiny_pretrain_config().model)


def granite31_2b_finetune_config():
    """SFT of Granite 3.1 2B on one 80 GB GPU: set checkpoint.pretrained_checkpoint and
    dataset.path."""
    return finetune("granite31_2b_sft", sized(GraniteBridge, SIZES["granite31_2b"]))


def granite31_2b_lora_config():
    """LoRA of Granite 3.1 2B: set checkpoint.pretrained_checkpoint and dataset.path."""
    return as_lora(granite31_2b_finetune_config(), "granite31_2b_lora")


def granite31_8b_finetune_config():
    """SFT of Granite 3.1 8B (TP=2, sized for 80 GB GPUs): set checkpoint.pretrained_checkpoint
    and dataset.path."""
    cfg = finetune("granite31_8b_sft", sized(GraniteBridge, SIZES["granite31_8b"]))
    cfg.model.tensor_model_parallel_size = 2
    return cfg


def granite31_8b_lora_config():
    """LoRA of Granite 3.1 8B on one 80 GB GPU: set checkpoint.pretrained_checkpoint and
    dataset.path."""
    cfg = as_lora(granite31_8b_finetune_config(), "granite31_8b_lora")
    cfg.model.tensor_model_parallel_size = 1  # frozen weights and adapters fit one GPU
    return cfg
