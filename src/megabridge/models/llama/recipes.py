"""Llama recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a converted
checkpoint): the architecture is then read from it, whatever the sizes below say."""

from megabridge.models.llama.bridge import LlamaBridge
from megabridge.recipes import as_lora, finetune, pretrain, sized, tiny_finetune, tiny_pretrain


def _llama3_rope(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip


_LLAMA3 = dict(num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072)  # fmt: skip
# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    "llama32_1b": dict(_LLAMA3, num_hidden_layers=16, hidden_size=2048, intermediate_size=8192,
                       head_dim=64, rope_scaling=_llama3_rope(32.0), tie_word_embeddings=True),
    "llama31_8b": dict(_LLAMA3, num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                       rope_scaling=_llama3_rope(8.0), tie_word_embeddings=False),
}  # fmt: skip
TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False)  # fmt: skip


def llama_tiny_pretrain_config():
    """A tiny Llama-shaped model on mock data (tests, smoke runs)."""
    return tiny_pretrain("llama_tiny", sized(LlamaBridge, TINY))


def llama_tiny_finetune_config():
    """SFT of a tiny Llama from checkpoint.pretrained_checkpoint (tests, smoke runs)."""
    return tiny_finetune("llama_tiny_sft", llama_tiny_pretrain_config().model)


def llama32_1b_pretrain_config():
    """Llama 3.2 1B from scratch on mock data (bf16 on GPU)."""
    cfg = pretrain("llama32_1b", sized(LlamaBridge, SIZES["llama32_1b"]))
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
    cfg = finetune("llama31_8b_sft", sized(LlamaBridge, SIZES["llama31_8b"]))
    cfg.model.tensor_model_parallel_size = 2
    return cfg


def llama31_8b_lora_config():
    """LoRA of Llama 3.1 8B on one GPU: set checkpoint.pretrained_checkpoint and dataset.path."""
    return as_lora(llama31_8b_finetune_config(), "llama31_8b_lora")
