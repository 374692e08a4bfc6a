"""Mistral recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a converted
checkpoint): the architecture is then read from it, whatever the sizes below say."""

from megabridge.models.mistral.bridge import MistralBridge
from megabridge.recipes import as_lora, finetune, sized, tiny_pretrain

_MISTRAL = dict(rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None)
# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    "mistral_7b": dict(_MISTRAL, num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       vocab_size=32768, tie_word_embeddings=False),
}  # fmt: skip
TINY = dict(_MISTRAL, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=256, rope_theta=1e4,
            sliding_window=32, tie_word_embeddings=False)  # fmt: skip


def mistral_tiny_pretrain_config():
    """A tiny Mistral-shaped model with a 32-token sliding window on mock data (tests, smoke runs)."""
    return tiny_pretrain("mistral_tiny", sized(MistralBridge, TINY))


def mistral_7b_finetune_config():
    """SFT of Mistral 7B v0.3 (TP=2): set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = finetune("mistral_7b_sft", sized(MistralBridge, SIZES["mistral_7b"]))
    cfg.model.tensor_model_parallel_size = 2
    return cfg


def mistral_7b_lora_config():
    """LoRA of Mistral 7B v0.3 on one GPU: set checkpoint.pretrained_checkpoint and dataset.path."""
    return as_lora(mistral_7b_finetune_config(), "mistral_7b_lora")
