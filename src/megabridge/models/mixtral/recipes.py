"""Mixtral recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a converted
checkpoint): the architecture is then read from it, whatever the sizes below say."""

from megabridge.models.mixtral.bridge import MixtralBridge
from megabridge.recipes import as_lora, finetune, sized, tiny_pretrain

_MIXTRAL = dict(rms_norm_eps=1e-5, num_experts_per_tok=2, router_aux_loss_coef=0.02,
                sliding_window=None, tie_word_embeddings=False)  # fmt: skip
# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    "mixtral_8x7b": dict(_MIXTRAL, num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                         num_local_experts=8, rope_theta=1e6),
}  # fmt: skip
TINY = dict(_MIXTRAL, num_hidden_layers=2, hidden_size=64, intermediate_size=32,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=256, num_local_experts=4,
            rope_theta=1e4)  # fmt: skip


def mixtral_tiny_pretrain_config():
    """A tiny Mixtral-shaped model (4 experts, top-2) on mock data (tests, smoke runs)."""
    return tiny_pretrain("mixtral_tiny", sized(MixtralBridge, TINY))


def mixtral_8x7b_finetune_config():
    """SFT of Mixtral 8x7B on 32 GPUs (PP=4, EP=8): set pretrained_checkpoint and dataset.path."""
    cfg = finetune("mixtral_8x7b_sft", sized(MixtralBridge, SIZES["mixtral_8x7b"]))
    m = cfg.model
    m.pipeline_model_parallel_size, m.expert_model_parallel_size = 4, 8
    m.moe_router_dtype = "fp32"
    cfg.optimizer.use_distributed_optimizer = True
    return cfg


def mixtral_8x7b_lora_config():
    """LoRA of Mixtral 8x7B (PP=4, EP=8), attention only: set pretrained_checkpoint, dataset.path."""
    return as_lora(mixtral_8x7b_finetune_config(), "mixtral_8x7b_lora")
