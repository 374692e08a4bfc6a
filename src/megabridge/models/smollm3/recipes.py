"""SmolLM3 recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a converted
checkpoint): the architecture is then read from it, whatever the sizes below say."""

from megabridge.models.smollm3.bridge import SmolLM3Bridge
from megabridge.recipes import as_lora, finetune, sized, tiny_finetune, tiny_pretrain

# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    # HuggingFaceTB/SmolLM3-3B: layers 3, 7, 11, ... (every 4th) without RoPE
    "smollm3_3b": dict(num_hidden_layers=36, hidden_size=2048, intermediate_size=11008,
                       num_attention_heads=16, num_key_value_heads=4, vocab_size=128256,
                       max_position_embeddings=65536, rope_theta=5000000.0, rms_norm_eps=1e-6,
                       no_rope_layers=[1, 1, 1, 0] * 9, use_sliding_window=False,
                       tie_word_embeddings=True),
}  # fmt: skip
TINY = dict(SIZES["smollm3_3b"], num_hidden_layers=4, hidden_size=64, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
            no_rope_layers=[1, 1, 1, 0])  # fmt: skip


def smollm3_tiny_pretrain_config():
    """A tiny SmolLM3-shaped model (a NoPE layer) on mock data (tests, smoke runs)."""
    return tiny_pretrain("smollm3_tiny", sized(SmolLM3Bridge, TINY))


def smollm3_tiny_finetune_config():
    """SFT of a tiny SmolLM3 from checkpoint.pretrained_checkpoint (tests, smoke runs)."""
    return tiny_finetune("smollm3_tiny_sft", smollm3_tiny_pretrain_config().model)


def smollm3_3b_finetune_config():
    """SFT of SmolLM3 3B on one 80 GB GPU: set checkpoint.pretrained_checkpoint and
    dataset.path."""
    return finetune("smollm3_3b_sft", sized(SmolLM3Bridge, SIZES["smollm3_3b"]))


def smollm3_3b_lora_config():
    """LoRA of SmolLM3 3B on one GPU: set checkpoint.pretrained_checkpoint and dataset.path."""
    return as_lora(smollm3_3b_finetune_config(), "smollm3_3b_lora")
