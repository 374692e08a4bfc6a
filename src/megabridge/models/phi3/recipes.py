"""Phi-3 recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a converted
checkpoint): the architecture is then read from it, whatever the sizes below say."""

from megabridge.models.phi3.bridge import Phi3Bridge
from megabridge.recipes import as_lora, finetune, sized, tiny_pretrain

_PHI3 = dict(rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    "phi3_mini": dict(_PHI3, num_hidden_layers=32, hidden_size=3072, intermediate_size=8192,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                      sliding_window=2047),
}  # fmt: skip
TINY = dict(_PHI3, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
            sliding_window=None, pad_token_id=0, eos_token_id=1)  # fmt: skip


def phi3_tiny_pretrain_config():
    """A tiny Phi-3-shaped model on mock data (tests, smoke runs)."""
    return tiny_pretrain("phi3_tiny", sized(Phi3Bridge, TINY))


def phi3_mini_finetune_config():
    """SFT of Phi-3-mini-4k (2047-token window): set checkpoint.pretrained_checkpoint and dataset.path."""
    return finetune("phi3_mini_sft", sized(Phi3Bridge, SIZES["phi3_mini"]))


def phi3_mini_lora_config():
    """LoRA of Phi-3-mini-4k: set checkpoint.pretrained_checkpoint and dataset.path."""
    return as_lora(phi3_mini_finetune_config(), "phi3_mini_lora")
