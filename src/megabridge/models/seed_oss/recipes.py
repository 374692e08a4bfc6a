"""Seed-OSS recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a converted
checkpoint): the architecture is then read from it, whatever the sizes below say."""

from megabridge.models.seed_oss.bridge import SeedOssBridge
from megabridge.recipes import as_lora, finetune, sized, tiny_finetune, tiny_pretrain

# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    # ByteDance-Seed/Seed-OSS-36B-Base (and -Instruct)
    "seed_oss_36b": dict(num_hidden_layers=64, hidden_size=5120, intermediate_size=27648,
                         num_attention_heads=80, num_key_value_heads=8, head_dim=128,
                         vocab_size=155136, max_position_embeddings=524288,
                         rope_theta=10000000.0, rms_norm_eps=1e-6, attention_bias=True,
                         attention_out_bias=False, mlp_bias=False, tie_word_embeddings=False),
}  # fmt: skip
TINY = dict(SIZES["seed_oss_36b"], num_hidden_layers=2, hidden_size=64, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=256)  # fmt: skip


def seed_oss_tiny_pretrain_config():
    """A tiny Seed-OSS-shaped model on mock data (tests, smoke runs)."""
    return tiny_pretrain("seed_oss_tiny", sized(SeedOssBridge, TINY))


def seed_oss_tiny_finetune_config():
    """SFT of a tiny Seed-OSS from checkpoint.pretrained_checkpoint (tests, smoke runs)."""
    return tiny_finetune("seed_oss_tiny_sft", seed_oss_tiny_pretrain_config().model)


def seed_oss_36b_finetune_config():
    """SFT of Seed-OSS 36B on 8 80 GB GPUs (TP=8): set checkpoint.pretrained_checkpoint and
    dataset.path."""
    cfg = finetune("seed_oss_36b_sft", sized(SeedOssBridge, SIZES["seed_oss_36b"]))
    cfg.model.tensor_model_parallel_size = 8
    cfg.model.sequence_parallel = True
    return cfg


def seed_oss_36b_lora_config():
    """LoRA of Seed-OSS 36B on 4 80 GB GPUs (TP=4): set checkpoint.pretrained_checkpoint and
    dataset.path."""
    cfg = as_lora(seed_oss_36b_finetune_config(), "seed_oss_36b_lora")
    cfg.model.tensor_model_parallel_size = 4
    return cfg
