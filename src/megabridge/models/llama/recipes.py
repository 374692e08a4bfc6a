"""Llama recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a converted
checkpoint): the architecture is then read from it, whatever the sizes below say."""

from megabridge.models.config import ModelConfig
from megabridge.recipes import as_lora, finetune, pretrain, tiny_finetune, tiny_pretrain


def _llama(layers, hidden, ffn, heads, groups, vocab, tied, rope_scaling=None, theta=500000.0):
    return ModelConfig(
        family="llama", num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
        num_attention_heads=heads, num_query_groups=groups, vocab_size=vocab, seq_length=4096,
        normalization="RMSNorm", activation="swiglu", position_embedding_type="rope",
        rotary_base=theta, rope_scaling=rope_scaling or {}, layernorm_epsilon=1e-5,
        share_embeddings_and_output_weights=tied,
    )  # fmt: skip


def _llama3_rope(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip


def llama_tiny_pretrain_config():
    """A tiny Llama-shaped model on mock data (tests, smoke runs)."""
    return tiny_pretrain("llama_tiny", _llama(2, 64, 128, 4, 2, 256, tied=False, theta=10000.0))


def llama_tiny_finetune_config():
    """SFT of a tiny Llama from checkpoint.pretrained_checkpoint (tests, smoke runs)."""
    return tiny_finetune("llama_tiny_sft", llama_tiny_pretrain_config().model)


def llama32_1b_pretrain_config():
    """Llama 3.2 1B from scratch on mock data (bf16 on GPU)."""
    cfg = pretrain(
        "llama32_1b",
        _llama(16, 2048, 8192, 32, 8, 128256, tied=True, rope_scaling=_llama3_rope(32.0)),
    )
    cfg.train.micro_batch_size = 4
    return cfg


def llama32_1b_finetune_config():
    """SFT of Llama 3.2 1B: set checkpoint.pretrained_checkpoint and dataset.path."""
    return finetune("llama32_1b_sft", llama32_1b_pretrain_config().model)


def llama32_1b_lora_config():
    """LoRA of Llama 3.2 1B: set checkpoint.pretrained_checkpoint and dataset.path."""
    return as_lora(llama32_1b_finetune_config(), "llama32_1b_lora")


def llama31_8b_finetune_config():
    """SFT of Llama 3.1 8B (TP=2 by default): set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = finetune(
        "llama31_8b_sft",
        _llama(32, 4096, 14336, 32, 8, 128256, tied=False, rope_scaling=_llama3_rope(8.0)),
    )
    cfg.model.tensor_model_parallel_size = 2
    return cfg


def llama31_8b_lora_config():
    """LoRA of Llama 3.1 8B on one GPU: set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = as_lora(llama31_8b_finetune_config(), "llama31_8b_lora")
    cfg.model.tensor_model_parallel_size = 1  # frozen weights and adapters fit one GPU
    return cfg
