"""Qwen3-VL-MoE (Qwen3VLMoeForConditionalGeneration, 30B-A3B, 235B-A22B): Qwen3-VL with a
Qwen3-MoE language model. Its experts are stacked per layer in the checkpoint:
``gate_up_proj`` [E, hidden, 2 * ffn] (gate and up halves) and ``down_proj`` [E, ffn,
hidden] as released; transformers 5 saves them [out, in], and both are read (as
transformers does: by shape); the export writes the released layout."""

from megabridge.conversion import blocks
from megabridge.conversion.mappings import hf_moved
from megabridge.conversion.moe import QWEN_MOE_CONFIG, sparse_step_fields, sparse_step_layer_freq
from megabridge.conversion.registry import register_bridge
from megabridge.models.qwen3_vl.bridge import HF_LANGUAGE_MODEL, TOWER_MAPPINGS, Qwen3VLBridge

TEXT_MAPPINGS = [
    *blocks.embeddings_and_head(),
    *blocks.final_norm(),
    *blocks.pre_norms(),
    *blocks.attention(),
    *blocks.qk_norm(),
    *blocks.gated_mlp(),  # the dense layers (mlp_only_layers)
    *blocks.router(),
    *blocks.stacked_gated_experts(either_way=True),
]


@register_bridge
class Qwen3VLMoeBridge(Qwen3VLBridge):
    """Qwen3-VL whose MLPs are Qwen3-MoE's (softmax top-k, always renormalised)."""

    family = "qwen3_vl_moe"
    architectures = ("Qwen3VLMoeForConditionalGeneration",)
    hf_model_type = "qwen3_vl_moe"
    NAME = "Qwen3-VL-MoE"
    CONFIG = QWEN_MOE_CONFIG
    # transformers' router renormalises the top-k weights whatever norm_topk_prob says:
    # Megatron-Core's softmax over the top-k logits is the same
    MEGATRON_FIXED = {
        **Qwen3VLBridge.MEGATRON_FIXED,
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": False,
    }
    MAPPINGS = [*hf_moved(TEXT_MAPPINGS, "model.", HF_LANGUAGE_MODEL), *TOWER_MAPPINGS]
    PARALLELISM = ("TP", "PP", "EP")
    NOTES = (
        "as Qwen3-VL (images and video frames, interleaved M-RoPE, DeepStack, tower blocks "
        "split over TP), with Qwen3-MoE experts stacked in the checkpoint; SFT and LoRA (tower "
        "blocks too) on images and video frames (padded)"
    )

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        cfg.moe_layer_freq = sparse_step_layer_freq(hf_config)

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        data.update(sparse_step_fields(cfg))
        data["norm_topk_prob"] = True
