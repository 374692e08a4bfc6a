"""Gemma 3 (text) recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a
converted checkpoint): the architecture is then read from it, whatever the sizes below say.

Only Gemma3ForCausalLM folders convert: google/gemma-3-1b-* is one; the 4B and larger Hub
checkpoints are Gemma3ForConditionalGeneration (text + vision), not supported yet, so their
recipes need a text-only Gemma3ForCausalLM folder (or start from scratch)."""

from megabridge.models.config import ModelConfig
from megabridge.recipes import as_lora, finetune, tiny_finetune, tiny_pretrain


def _gemma3(layers, hidden, ffn, heads, groups, head_dim=256, query_scalar=256,
            vocab=262208, window=1024, rope_scaling=None, seq_length=4096):  # fmt: skip
    return ModelConfig(
        family="gemma3", num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
        num_attention_heads=heads, num_query_groups=groups, kv_channels=head_dim,
        vocab_size=vocab, seq_length=seq_length, normalization="RMSNorm", layernorm_epsilon=1e-6,
        layernorm_zero_centered_gamma=True, norm_placement="pre_post", qk_layernorm=True,
        activation="geglu", position_embedding_type="rope", rotary_base=1_000_000.0,
        rope_scaling=rope_scaling or {}, local_rotary_base=10_000.0,
        share_embeddings_and_output_weights=True, embedding_multiplier=hidden**0.5,
        softmax_scale=query_scalar**-0.5, sliding_window=window,
        sliding_window_layers=[i for i in range(layers) if (i + 1) % 6],  # every 6th: global
    )  # fmt: skip


_LINEAR_8 = {"rope_type": "linear", "factor": 8.0}  # the global layers of 4B and up


def gemma3_tiny_pretrain_config():
    """A tiny Gemma 3-shaped model on mock data (tests, smoke runs)."""
    model = _gemma3(4, 64, 128, 4, 2, 24, 20, vocab=256, window=8, seq_length=128)
    model.sliding_window_layers = [0, 2, 3]
    return tiny_pretrain("gemma3_tiny", model)


def gemma3_tiny_finetune_config():
    """SFT of a tiny Gemma 3 from checkpoint.pretrained_checkpoint (tests, smoke runs)."""
    return tiny_finetune("gemma3_tiny_sft", gemma3_tiny_pretrain_config().model)


def gemma3_1b_finetune_config():
    """SFT of Gemma 3 1B: set checkpoint.pretrained_checkpoint and dataset.path."""
    model = _gemma3(26, 1152, 6912, 4, 1, vocab=262144, window=512)
    return finetune("gemma3_1b_sft", model)


def gemma3_1b_lora_config():
    """LoRA of Gemma 3 1B: set checkpoint.pretrained_checkpoint and dataset.path."""
    return as_lora(gemma3_1b_finetune_config(), "gemma3_1b_lora")


def gemma3_4b_finetune_config():
    """SFT of Gemma 3 4B text (needs a Gemma3ForCausalLM folder): set the checkpoint and data."""
    return finetune("gemma3_4b_sft", _gemma3(34, 2560, 10240, 8, 4, rope_scaling=_LINEAR_8))


def gemma3_4b_lora_config():
    """LoRA of Gemma 3 4B text (needs a Gemma3ForCausalLM folder): set the checkpoint and data."""
    return as_lora(gemma3_4b_finetune_config(), "gemma3_4b_lora")


def gemma3_12b_finetune_config():
    """SFT of Gemma 3 12B text (TP=4; needs a Gemma3ForCausalLM folder): set checkpoint and data."""
    cfg = finetune("gemma3_12b_sft", _gemma3(48, 3840, 15360, 16, 8, rope_scaling=_LINEAR_8))
    cfg.model.tensor_model_parallel_size = 4
    return cfg


def gemma3_27b_finetune_config():
    """SFT of Gemma 3 27B text (TP=8; needs a Gemma3ForCausalLM folder): set checkpoint and data."""
    # 27B: head_dim 128, scores scaled by (hidden / heads)**-0.5 = 168**-0.5.
    model = _gemma3(62, 5376, 21504, 32, 16, head_dim=128, query_scalar=168, rope_scaling=_LINEAR_8)
    cfg = finetune("gemma3_27b_sft", model)
    cfg.model.tensor_model_parallel_size = 8
    return cfg
