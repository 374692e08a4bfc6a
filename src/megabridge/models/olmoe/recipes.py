"""OLMoE recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a converted
checkpoint): the architecture is then read from it, whatever the sizes below say."""

from megabridge.models.olmoe.bridge import OlmoeBridge
from megabridge.recipes import as_lora, finetune, sized, tiny_pretrain

# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    # allenai/OLMoE-1B-7B-0924: 64 experts of 1024, top-8, no renormalisation
    "olmoe_1b_7b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=1024,
                        num_attention_heads=16, num_key_value_heads=16, vocab_size=50304,
                        max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                        num_experts=64, num_experts_per_tok=8, norm_topk_prob=False,
                        router_aux_loss_coef=0.01, tie_word_embeddings=False),
}  # fmt: skip
TINY = dict(SIZES["olmoe_1b_7b"], num_hidden_layers=2, hidden_size=64, intermediate_size=32,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=256, num_experts=4,
            num_experts_per_tok=2)  # fmt: skip


def olmoe_tiny_pretrain_config():
    """A tiny OLMoE-shaped model (4 experts, top-2) on mock data (tests, smoke runs)."""
    return tiny_pretrain("olmoe_tiny", sized(OlmoeBridge, TINY))


def olmoe_1b_7b_finetune_config():
    """SFT of OLMoE-1B-7B on 8 80 GB GPUs (EP=8): set checkpoint.pretrained_checkpoint and
    dataset.path."""
    cfg = finetune("olmoe_1b_7b_sft", sized(OlmoeBridge, SIZES["olmoe_1b_7b"]))
    cfg.model.expert_model_parallel_size = 8
    cfg.model.moe_router_dtype = "fp32"  # 64 experts: route in fp32
    cfg.optimizer.use_distributed_optimizer = True
    return cfg


def olmoe_1b_7b_lora_config():
    """LoRA of OLMoE-1B-7B on 8 80 GB GPUs (EP=8; attention adapted, experts frozen): set
    checkpoint.pretrained_checkpoint and dataset.path."""
    return as_lora(olmoe_1b_7b_finetune_config(), "olmoe_1b_7b_lora")
