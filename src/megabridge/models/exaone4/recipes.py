"""EXAONE 4 recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a converted
checkpoint): the architecture is then read from it, whatever the sizes below say."""

from megabridge.models.exaone4.bridge import Exaone4Bridge
from megabridge.recipes import as_lora, finetune, sized, tiny_finetune, tiny_pretrain

_LLAMA3_16 = {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    # LGAI-EXAONE/EXAONE-4.0-32B: three sliding-window layers (RoPE), then a global one (NoPE)
    "exaone4_32b": dict(num_hidden_layers=64, hidden_size=5120, intermediate_size=27392,
                        num_attention_heads=40, num_key_value_heads=8, head_dim=128,
                        vocab_size=102400, max_position_embeddings=131072, rms_norm_eps=1e-5,
                        rope_theta=1000000.0, rope_scaling=_LLAMA3_16, sliding_window=4096,
                        layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * 16,
                        tie_word_embeddings=False),
}  # fmt: skip
TINY = dict(SIZES["exaone4_32b"], num_hidden_layers=4, hidden_size=64, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=256,
            sliding_window=8, layer_types=["sliding_attention"] * 3 + ["full_attention"])  # fmt: skip


def exaone4_tiny_pretrain_config():
    """A tiny EXAONE 4-shaped model (windows, a NoPE global layer) on mock data (tests)."""
    return tiny_pretrain("exaone4_tiny", sized(Exaone4Bridge, TINY))


def exaone4_tiny_finetune_config():
    """SFT of a tiny EXAONE 4 from checkpoint.pretrained_checkpoint (tests, smoke runs)."""
    return tiny_finetune("exaone4_tiny_sft", exaone4_tiny_pretrain_config().model)


def exaone4_32b_finetune_config():
    """SFT of EXAONE 4.0 32B on 8 80 GB GPUs (TP=8): set checkpoint.pretrained_checkpoint and
    dataset.path."""
    cfg = finetune("exaone4_32b_sft", sized(Exaone4Bridge, SIZES["exaone4_32b"]))
    cfg.model.tensor_model_parallel_size = 8
    cfg.model.sequence_parallel = True
    return cfg


def exaone4_32b_lora_config():
    """LoRA of EXAONE 4.0 32B on 4 80 GB GPUs (TP=4): set checkpoint.pretrained_checkpoint and
    dataset.path."""
    cfg = as_lora(exaone4_32b_finetune_config(), "exaone4_32b_lora")
    cfg.model.tensor_model_parallel_size = 4
    return cfg
