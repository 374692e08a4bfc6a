"""Qwen3-MoE recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a converted
checkpoint): the architecture is then read from it."""

from megabridge.models.qwen3_moe.bridge import Qwen3MoeBridge
from megabridge.recipes import as_lora, finetune, sized, tiny_pretrain

_QWEN3_MOE = dict(rms_norm_eps=1e-6, rope_theta=1e6, norm_topk_prob=True,
                  router_aux_loss_coef=0.001, tie_word_embeddings=False)  # fmt: skip
# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    "qwen3_30b_a3b": dict(_QWEN3_MOE, num_hidden_layers=48, hidden_size=2048,
                          intermediate_size=6144, moe_intermediate_size=768,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          vocab_size=151936, num_experts=128, num_experts_per_tok=8),
}  # fmt: skip
TINY = dict(_QWEN3_MOE, num_hidden_layers=2, hidden_size=64, intermediate_size=96,
            moe_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=256, num_experts=4, num_experts_per_tok=2)  # fmt: skip


def qwen3_moe_tiny_pretrain_config():
    """A tiny Qwen3-MoE-shaped model (4 experts, top-2, QK-norm) on mock data (tests, smoke runs)."""
    return tiny_pretrain("qwen3_moe_tiny", sized(Qwen3MoeBridge, TINY))


def qwen3_30b_a3b_finetune_config():
    """SFT of Qwen3-30B-A3B on 8 GPUs (EP=8): set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = finetune("qwen3_30b_a3b_sft", sized(Qwen3MoeBridge, SIZES["qwen3_30b_a3b"]))
    cfg.model.expert_model_parallel_size = 8
    cfg.model.moe_router_dtype = "fp32"  # 128 experts: route in fp32
    cfg.optimizer.use_distributed_optimizer = True
    return cfg


def qwen3_30b_a3b_lora_config():
    """LoRA of Qwen3-30B-A3B on 8 GPUs (EP=8): set checkpoint.pretrained_checkpoint and dataset.path."""
    return as_lora(qwen3_30b_a3b_finetune_config(), "qwen3_30b_a3b_lora")
