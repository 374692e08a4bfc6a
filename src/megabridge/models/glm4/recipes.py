"""GLM-4 (dense, 0414) recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a
converted checkpoint): the architecture is then read from it, whatever the sizes below say."""

from megabridge.models.glm4.bridge import Glm4Bridge
from megabridge.recipes import as_lora, finetune, sized, tiny_pretrain

_GLM4 = dict(vocab_size=151552, rms_norm_eps=1e-5, rope_theta=10000.0, partial_rotary_factor=0.5,
             attention_bias=True, head_dim=128, tie_word_embeddings=False)  # fmt: skip
# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    "glm4_9b": dict(_GLM4, num_hidden_layers=40, hidden_size=4096, intermediate_size=13696,
                    num_attention_heads=32, num_key_value_heads=2),
}  # fmt: skip
TINY = dict(_GLM4, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
            pad_token_id=0, eos_token_id=1)  # fmt: skip


def glm4_tiny_pretrain_config():
    """A tiny GLM-4-shaped model on mock data (tests, smoke runs)."""
    return tiny_pretrain("glm4_tiny", sized(Glm4Bridge, TINY))


def glm4_9b_finetune_config():
    """SFT of GLM-4-9B-0414, sized for one node of 8 H200 (TP=1, distributed optimizer):
    set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = finetune("glm4_9b_sft", sized(Glm4Bridge, SIZES["glm4_9b"]))
    cfg.optimizer.use_distributed_optimizer = True
    return cfg


def glm4_9b_lora_config():
    """LoRA of GLM-4-9B-0414 on one H200: set checkpoint.pretrained_checkpoint and dataset.path."""
    return as_lora(glm4_9b_finetune_config(), "glm4_9b_lora")
