"""Qwen3-VL-MoE recipes: SFT and LoRA on chat JSONL with images (dataset.type=sft, padded),
as Qwen3-VL's. Point checkpoint.pretrained_checkpoint at the local HF folder (its processor
renders the data)."""

from megabridge.models.qwen3_vl.recipes import ROPE, TOKENS, VISION
from megabridge.models.qwen3_vl_moe import tiny
from megabridge.models.qwen3_vl_moe.bridge import Qwen3VLMoeBridge
from megabridge.recipes import as_lora, sized, tiny_vlm_finetune, vlm_finetune

# HF config.json fields of each size (nested as released); tests/data/hf_configs/<size>.json.
SIZES = {
    "qwen3_vl_30b_a3b": dict(
        text_config=dict(num_hidden_layers=48, hidden_size=2048, intermediate_size=6144,
                         moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                         num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                         vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=262144,
                         router_aux_loss_coef=0.001, rope_parameters=ROPE),
        vision_config=dict(VISION, out_hidden_size=2048), tie_word_embeddings=False, **TOKENS,
    ),
}  # fmt: skip


def qwen3_vl_moe_tiny_finetune_config():
    """A tiny Qwen3-VL-MoE (tests, smoke runs): set checkpoint.pretrained_checkpoint,
    dataset.path."""
    model = sized(Qwen3VLMoeBridge, tiny.TINY["base"])
    return tiny_vlm_finetune("qwen3_vl_moe_tiny_sft", model)


def qwen3_vl_moe_tiny_lora_config():
    """LoRA of the tiny Qwen3-VL-MoE's language model (tests, smoke runs)."""
    return as_lora(qwen3_vl_moe_tiny_finetune_config(), "qwen3_vl_moe_tiny_lora")


def qwen3_vl_30b_a3b_finetune_config():
    """SFT of Qwen3-VL 30B-A3B on 8 GPUs (EP=8, the tower replicated): set
    checkpoint.pretrained_checkpoint and dataset.path."""
    model = sized(Qwen3VLMoeBridge, SIZES["qwen3_vl_30b_a3b"])
    cfg = vlm_finetune("qwen3_vl_30b_a3b_sft", model)
    cfg.model.expert_model_parallel_size = 8
    cfg.model.moe_router_dtype = "fp32"  # 128 experts: route in fp32
    cfg.optimizer.use_distributed_optimizer = True
    return cfg


def qwen3_vl_30b_a3b_lora_config():
    """LoRA of Qwen3-VL 30B-A3B's language model on 8 GPUs (EP=8, vision tower frozen)."""
    return as_lora(qwen3_vl_30b_a3b_finetune_config(), "qwen3_vl_30b_a3b_lora")
