"""Gemma 2 recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a converted
checkpoint): the architecture is then read from it, whatever the sizes below say."""

from megabridge.models.config import ModelConfig
from megabridge.recipes import as_lora, finetune, tiny_finetune, tiny_pretrain


def _gemma2(layers, hidden, ffn, heads, groups, head_dim, query_scalar, vocab=256000, window=4096):
    return ModelConfig(
        family="gemma2", num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
        num_attention_heads=heads, num_query_groups=groups, kv_channels=head_dim,
        vocab_size=vocab, seq_length=4096, normalization="RMSNorm", layernorm_epsilon=1e-6,
        layernorm_zero_centered_gamma=True, norm_placement="pre_post", activation="geglu",
        position_embedding_type="rope", rotary_base=10000.0,
        share_embeddings_and_output_weights=True, embedding_multiplier=hidden**0.5,
        softmax_scale=query_scalar**-0.5, attn_logit_softcap=50.0, final_logit_softcap=30.0,
        sliding_window=window, sliding_window_layers=list(range(0, layers, 2)),  # even: local
    )  # fmt: skip


def gemma2_tiny_pretrain_config():
    """A tiny Gemma 2-shaped model on mock data (tests, smoke runs)."""
    return tiny_pretrain("gemma2_tiny", _gemma2(2, 64, 128, 4, 2, 24, 20, vocab=256, window=8))


def gemma2_tiny_finetune_config():
    """SFT of a tiny Gemma 2 from checkpoint.pretrained_checkpoint (tests, smoke runs)."""
    return tiny_finetune("gemma2_tiny_sft", gemma2_tiny_pretrain_config().model)


def gemma2_2b_finetune_config():
    """SFT of Gemma 2 2B: set checkpoint.pretrained_checkpoint and dataset.path."""
    return finetune("gemma2_2b_sft", _gemma2(26, 2304, 9216, 8, 4, 256, 256))


def gemma2_2b_lora_config():
    """LoRA of Gemma 2 2B: set checkpoint.pretrained_checkpoint and dataset.path."""
    return as_lora(gemma2_2b_finetune_config(), "gemma2_2b_lora")


def gemma2_9b_finetune_config():
    """SFT of Gemma 2 9B (TP=2 by default): set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = finetune("gemma2_9b_sft", _gemma2(42, 3584, 14336, 16, 8, 256, 256))
    cfg.model.tensor_model_parallel_size = 2
    return cfg


def gemma2_9b_lora_config():
    """LoRA of Gemma 2 9B on one GPU: set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = as_lora(gemma2_9b_finetune_config(), "gemma2_9b_lora")
    cfg.model.tensor_model_parallel_size = 1
    return cfg


def gemma2_27b_finetune_config():
    """SFT of Gemma 2 27B (TP=8): set checkpoint.pretrained_checkpoint and dataset.path."""
    # 27B scales scores by (hidden / heads)**-0.5 = 144**-0.5, not head_dim**-0.5.
    cfg = finetune("gemma2_27b_sft", _gemma2(46, 4608, 36864, 32, 16, 128, 144))
    cfg.model.tensor_model_parallel_size = 8
    return cfg
