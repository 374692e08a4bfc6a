"""OLMo 2 recipes (torch layer spec: post-norms and across-heads QK norm). Point
checkpoint.pretrained_checkpoint at a local HF folder (or a converted checkpoint): the
architecture is then read from it, whatever the sizes below say."""

from megabridge.models.config import ModelConfig
from megabridge.recipes import as_lora, finetune, tiny_pretrain


def _olmo2(layers, hidden, ffn, heads, groups, vocab):
    return ModelConfig(
        family="olmo2", num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
        num_attention_heads=heads, num_query_groups=groups, vocab_size=vocab, seq_length=4096,
        normalization="RMSNorm", activation="swiglu", position_embedding_type="rope",
        rotary_base=500000.0, layernorm_epsilon=1e-6, norm_placement="post",
        qk_norm_across_heads=True,
    )  # fmt: skip


def olmo2_tiny_pretrain_config():
    """A tiny OLMo-2-shaped model on mock data (tests, smoke runs)."""
    return tiny_pretrain("olmo2_tiny", _olmo2(2, 64, 128, 4, 2, 256))


def olmo2_7b_finetune_config():
    """SFT of OLMo 2 7B (TP=2): set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = finetune("olmo2_7b_sft", _olmo2(32, 4096, 11008, 32, 32, 100352))
    cfg.model.tensor_model_parallel_size = 2
    return cfg


def olmo2_7b_lora_config():
    """LoRA of OLMo 2 7B on one GPU: set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = as_lora(olmo2_7b_finetune_config(), "olmo2_7b_lora")
    cfg.model.tensor_model_parallel_size = 1  # frozen weights and adapters fit one GPU
    return cfg
