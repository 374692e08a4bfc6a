"""Mixtral recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a converted
checkpoint): the architecture is then read from it, whatever the sizes below say."""

from megabridge.models.config import ModelConfig
from megabridge.recipes import as_lora, finetune, tiny_pretrain


def _mixtral(layers, hidden, ffn, heads, groups, vocab, experts, topk, aux_loss, theta):
    return ModelConfig(
        family="mixtral", num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
        num_attention_heads=heads, num_query_groups=groups, vocab_size=vocab, seq_length=4096,
        normalization="RMSNorm", activation="swiglu", position_embedding_type="rope",
        rotary_base=theta, layernorm_epsilon=1e-5, num_moe_experts=experts,
        moe_router_topk=topk, moe_aux_loss_coeff=aux_loss,
    )  # fmt: skip


def mixtral_tiny_pretrain_config():
    """A tiny Mixtral-shaped model (4 experts, top-2) on mock data (tests, smoke runs)."""
    return tiny_pretrain("mixtral_tiny", _mixtral(2, 64, 32, 4, 2, 256, 4, 2, 0.02, 10000.0))


def mixtral_8x7b_finetune_config():
    """SFT of Mixtral 8x7B on 32 GPUs (PP=4, EP=8): set pretrained_checkpoint and dataset.path."""
    cfg = finetune(
        "mixtral_8x7b_sft",
        _mixtral(32, 4096, 14336, 32, 8, 32000, 8, 2, 0.02, 1000000.0),
    )
    m = cfg.model
    m.pipeline_model_parallel_size, m.expert_model_parallel_size = 4, 8
    m.moe_router_dtype = "fp32"
    cfg.optimizer.use_distributed_optimizer = True
    return cfg


def mixtral_8x7b_lora_config():
    """LoRA of Mixtral 8x7B (PP=4, EP=8), attention only: set pretrained_checkpoint, dataset.path."""
    return as_lora(mixtral_8x7b_finetune_config(), "mixtral_8x7b_lora")
