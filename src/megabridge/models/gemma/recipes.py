"""Gemma (1) recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a
converted checkpoint): the architecture is then read from it, whatever the sizes below say."""

from megabridge.models.gemma.bridge import GemmaBridge
from megabridge.recipes import as_lora, finetune, sized, tiny_finetune, tiny_pretrain

_GEMMA = dict(vocab_size=256000, head_dim=256, rms_norm_eps=1e-6, rope_theta=10000.0,
              max_position_embeddings=8192, hidden_act="gelu", tie_word_embeddings=True)  # fmt: skip
# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    # gemma-2b: multi-query attention (one key/value head)
    "gemma_2b": dict(_GEMMA, num_hidden_layers=18, hidden_size=2048, intermediate_size=16384,
                     num_attention_heads=8, num_key_value_heads=1),
    "gemma_7b": dict(_GEMMA, num_hidden_layers=28, hidden_size=3072, intermediate_size=24576,
                     num_attention_heads=16, num_key_value_heads=16),
}  # fmt: skip
TINY = dict(_GEMMA, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, vocab_size=256)  # fmt: skip


def gemma_tiny_pretrain_config():
    """A tiny Gemma-shaped model on mock data (tests, smoke runs)."""
    return tiny_pretrain("gemma_tiny", sized(GemmaBridge, TINY))


def gemma_tiny_finetune_config():
    """SFT of a tiny Gemma from checkpoint.pretrained_checkpoint (tests, smoke runs)."""
    return tiny_finetune("gemma_tiny_sft", gemma_tiny_pretrain_config().model)


def gemma_2b_finetune_config():
    """SFT of Gemma 2B on one 80 GB GPU: set checkpoint.pretrained_checkpoint and dataset.path."""
    return finetune("gemma_2b_sft", sized(GemmaBridge, SIZES["gemma_2b"]))


def gemma_2b_lora_config():
    """LoRA of Gemma 2B: set checkpoint.pretrained_checkpoint and dataset.path."""
    return as_lora(gemma_2b_finetune_config(), "gemma_2b_lora")


def gemma_7b_finetune_config():
    """SFT of Gemma 7B (TP=2, sized for 80 GB GPUs): set checkpoint.pretrained_checkpoint and
    dataset.path."""
    cfg = finetune("gemma_7b_sft", sized(GemmaBridge, SIZES["gemma_7b"]))
    cfg.model.tensor_model_parallel_size = 2
    return cfg


def gemma_7b_lora_config():
    """LoRA of Gemma 7B on one 80 GB GPU: set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = as_lora(gemma_7b_finetune_config(), "gemma_7b_lora")
    cfg.model.tensor_model_parallel_size = 1  # frozen weights and adapters fit one GPU
    return cfg
