"""OLMoE (1B-7B): Llama's pre-norms, QK norm over all heads at once (as OLMo 2), and every MLP
a softmax-routed mixture of experts without a shared expert.

transformers softmaxes over all experts and keeps the top k, divided by their sum only
with norm_topk_prob (off in the releases): Megatron-Core's pre-softmax router is the
first, its plain router (softmax over the top-k logits) the second.
"""

from megabridge.conversion import blocks
from megabridge.conversion.family import COMMON_CONFIG, LLAMA_LIKE, FamilyBridge
from megabridge.conversion.registry import register_bridge


@register_bridge
class OlmoeBridge(FamilyBridge):
    family = "olmoe"
    architectures = ("OlmoeForCausalLM",)
    hf_model_type = "olmoe"
    NAME = "OLMoE"
    # intermediate_size is each expert's size (there is no dense MLP).
    CONFIG = {
        **COMMON_CONFIG,
        "num_experts": "num_moe_experts",
        "num_experts_per_tok": "moe_router_topk",
        "router_aux_loss_coef": "moe_aux_loss_coeff",
    }
    MEGATRON_FIXED = {
        **LLAMA_LIKE,
        "qk_norm_across_heads": True,
        "moe_router_score_function": "softmax",
    }
    HF_FIXED = dict(hidden_act="silu", attention_bias=False, clip_qkv=None)
    UNSUPPORTED = {
        "attention_bias": "a bias on o_proj as well as q/k/v",
        "clip_qkv": "Megatron-Core's attention has no clamp of q/k/v",
    }
    MAPPINGS = [
        *blocks.embeddings_and_head(),
        *blocks.final_norm(),
        *blocks.pre_norms(),
        *blocks.attention(),
        *blocks.qk_norm(),
        *blocks.router(),
        *blocks.routed_experts(),
    ]
    PARALLELISM = ("TP", "PP", "EP")
    NOTES = "QK norm over all heads (torch spec); softmax top-k routing; norm_topk_prob"

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        cfg.moe_router_pre_softmax = not hf_config.norm_topk_prob

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        data["norm_topk_prob"] = not cfg.moe_router_pre_softmax
