"""Qwen1.5-MoE / Qwen2-MoE recipes. Point checkpoint.pretrained_checkpoint at a local HF folder
(or a converted checkpoint): the architecture is then read from it."""

from megabridge.models.config import ModelConfig
from megabridge.recipes import as_lora, finetune, tiny_pretrain


def _qwen2_moe(layers, hidden, ffn, moe_ffn, shared_ffn, heads, groups, vocab, experts, topk):
    return ModelConfig(
        family="qwen2_moe", num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
        num_attention_heads=heads, num_query_groups=groups, vocab_size=vocab, seq_length=4096,
        normalization="RMSNorm", activation="swiglu", position_embedding_type="rope",
        rotary_base=1000000.0, layernorm_epsilon=1e-6, add_qkv_bias=True,
        num_moe_experts=experts, moe_router_topk=topk, moe_ffn_hidden_size=moe_ffn,
        moe_shared_expert_intermediate_size=shared_ffn, moe_shared_expert_gate=True,
        moe_router_pre_softmax=True, moe_aux_loss_coeff=0.001,
    )  # fmt: skip


def qwen2_moe_tiny_pretrain_config():
    """A tiny Qwen2-MoE-shaped model (4 experts, top-2, gated shared expert) on mock data."""
    return tiny_pretrain("qwen2_moe_tiny", _qwen2_moe(2, 64, 96, 32, 48, 4, 2, 256, 4, 2))


def qwen15_moe_a27b_finetune_config():
    """SFT of Qwen1.5-MoE-A2.7B (EP=4): set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = finetune(
        "qwen15_moe_a27b_sft",
        _qwen2_moe(24, 2048, 5632, 1408, 5632, 16, 16, 151936, 60, 4),
    )
    cfg.model.expert_model_parallel_size = 4
    cfg.model.moe_router_dtype = "fp32"
    cfg.optimizer.use_distributed_optimizer = True
    return cfg


def qwen15_moe_a27b_lora_config():
    """LoRA of Qwen1.5-MoE-A2.7B (EP=4), attention only: set pretrained_checkpoint, dataset.path."""
    return as_lora(qwen15_moe_a27b_finetune_config(), "qwen15_moe_a27b_lora")
