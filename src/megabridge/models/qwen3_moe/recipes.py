"""Qwen3-MoE recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a converted
checkpoint): the architecture is then read from it."""

from megabridge.models.config import ModelConfig
from megabridge.recipes import as_lora, finetune, tiny_pretrain


def _qwen3_moe(layers, hidden, ffn, moe_ffn, heads, groups, head_dim, vocab, experts, topk):
    return ModelConfig(
        family="qwen3_moe", num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
        num_attention_heads=heads, num_query_groups=groups, kv_channels=head_dim,
        vocab_size=vocab, seq_length=4096, normalization="RMSNorm", activation="swiglu",
        position_embedding_type="rope", rotary_base=1000000.0, layernorm_epsilon=1e-6,
        qk_layernorm=True, num_moe_experts=experts, moe_router_topk=topk,
        moe_ffn_hidden_size=moe_ffn, moe_aux_loss_coeff=0.001,
    )  # fmt: skip


def qwen3_moe_tiny_pretrain_config():
    """A tiny Qwen3-MoE-shaped model (4 experts, top-2, QK-norm) on mock data (tests, smoke runs)."""
    return tiny_pretrain("qwen3_moe_tiny", _qwen3_moe(2, 64, 96, 32, 4, 2, 16, 256, 4, 2))


def qwen3_30b_a3b_finetune_config():
    """SFT of Qwen3-30B-A3B on 8 GPUs (EP=8): set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = finetune(
        "qwen3_30b_a3b_sft",
        _qwen3_moe(48, 2048, 6144, 768, 32, 4, 128, 151936, 128, 8),
    )
    cfg.model.expert_model_parallel_size = 8
    cfg.model.moe_router_dtype = "fp32"  # 128 experts: route in fp32
    cfg.optimizer.use_distributed_optimizer = True
    return cfg


def qwen3_30b_a3b_lora_config():
    """LoRA of Qwen3-30B-A3B on 8 GPUs (EP=8): set checkpoint.pretrained_checkpoint and dataset.path."""
    return as_lora(qwen3_30b_a3b_finetune_config(), "qwen3_30b_a3b_lora")
