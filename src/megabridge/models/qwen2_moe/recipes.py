"""Qwen1.5-MoE / Qwen2-MoE recipes. Point checkpoint.pretrained_checkpoint at a local HF folder
(or a converted checkpoint): the architecture is then read from it."""

from megabridge.models.qwen2_moe.bridge import Qwen2MoeBridge
from megabridge.recipes import as_lora, finetune, sized, tiny_pretrain

_QWEN2_MOE = dict(rms_norm_eps=1e-6, rope_theta=1e6, norm_topk_prob=False,
                  router_aux_loss_coef=0.001, tie_word_embeddings=False)  # fmt: skip
# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    "qwen15_moe_a27b": dict(_QWEN2_MOE, num_hidden_layers=24, hidden_size=2048,
                            intermediate_size=5632, moe_intermediate_size=1408,
                            shared_expert_intermediate_size=5632, num_attention_heads=16,
                            num_key_value_heads=16, vocab_size=151936, num_experts=60,
                            num_experts_per_tok=4),
}  # fmt: skip
TINY = dict(_QWEN2_MOE, num_hidden_layers=2, hidden_size=64, intermediate_size=96,
            moe_intermediate_size=32, shared_expert_intermediate_size=48, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, num_experts=4,
            num_experts_per_tok=2)  # fmt: skip


def qwen2_moe_tiny_pretrain_config():
    """A tiny Qwen2-MoE-shaped model (4 experts, top-2, gated shared expert) on mock data."""
    return tiny_pretrain("qwen2_moe_tiny", sized(Qwen2MoeBridge, TINY))


def qwen15_moe_a27b_finetune_config():
    """SFT of Qwen1.5-MoE-A2.7B (EP=4): set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = finetune("qwen15_moe_a27b_sft", sized(Qwen2MoeBridge, SIZES["qwen15_moe_a27b"]))
    cfg.model.expert_model_parallel_size = 4
    cfg.model.moe_router_dtype = "fp32"
    cfg.optimizer.use_distributed_optimizer = True
    return cfg


def qwen15_moe_a27b_lora_config():
    """LoRA of Qwen1.5-MoE-A2.7B (EP=4), attention only: set pretrained_checkpoint, dataset.path."""
    return as_lora(qwen15_moe_a27b_finetune_config(), "qwen15_moe_a27b_lora")
