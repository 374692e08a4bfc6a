"""OLMo 2 recipes (torch layer spec: post-norms and across-heads QK norm). Point
checkpoint.pretrained_checkpoint at a local HF folder (or a converted checkpoint): the
architecture is then read from it, whatever the sizes below say."""

from megabridge.models.olmo2.bridge import Olmo2Bridge
from megabridge.recipes import as_lora, finetune, sized, tiny_pretrain

_OLMO2 = dict(rms_norm_eps=1e-6, rope_theta=500000.0, tie_word_embeddings=False)
# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    "olmo2_7b": dict(_OLMO2, num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=100352),
}  # fmt: skip
TINY = dict(_OLMO2, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
            eos_token_id=1)  # fmt: skip


def olmo2_tiny_pretrain_config():
    """A tiny OLMo-2-shaped model on mock data (tests, smoke runs)."""
    return tiny_pretrain("olmo2_tiny", sized(Olmo2Bridge, TINY))


def olmo2_7b_finetune_config():
    """SFT of OLMo 2 7B (TP=2): set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = finetune("olmo2_7b_sft", sized(Olmo2Bridge, SIZES["olmo2_7b"]))
    cfg.model.tensor_model_parallel_size = 2
    return cfg


def olmo2_7b_lora_config():
    """LoRA of OLMo 2 7B on one GPU: set checkpoint.pretrained_checkpoint and dataset.path."""
    return as_lora(olmo2_7b_finetune_config(), "olmo2_7b_lora")
