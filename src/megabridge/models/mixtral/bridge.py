"""Mixtral (8x7B, 8x22B): Llama attention, every MLP a softmax-routed mixture of experts.

transformers routes with softmax over all experts, keeps the top-k and divides
them by their sum. Megatron-Core's router without pre-softmax takes the top-k
logits and softmaxes over them: exp(l_i) / sum_topk exp(l_j), the same numbers.
"""

from megabridge.conversion import blocks
from megabridge.conversion.family import COMMON_CONFIG, LLAMA_LIKE, FamilyBridge
from megabridge.conversion.registry import register_bridge
from megabridge.errors import UserError

HF_MOE = f"{blocks.HF_LAYER}.block_sparse_moe"


@register_bridge
class MixtralBridge(FamilyBridge):
    family = "mixtral"
    architectures = ("MixtralForCausalLM",)
    hf_model_type = "mixtral"
    CONFIG = {
        **COMMON_CONFIG,
        "num_local_experts": "num_moe_experts",
        "num_experts_per_tok": "moe_router_topk",
        "router_aux_loss_coef": "moe_aux_loss_coeff",
    }
    MEGATRON_FIXED = {
        **LLAMA_LIKE,
        "moe_router_pre_softmax": False,
        "moe_router_score_function": "softmax",
    }
    HF_FIXED = dict(hidden_act="silu", sliding_window=None, router_jitter_noise=0.0)
    MAPPINGS = [
        *blocks.embeddings_and_head(),
        *blocks.final_norm(),
        *blocks.pre_norms(),
        *blocks.attention(),
        *blocks.router(f"{HF_MOE}.gate"),
        *blocks.routed_experts(f"{HF_MOE}.experts", blocks.W1_W3_W2),
    ]
    PARALLELISM = ("TP", "PP", "EP")
    NOTES = "softmax top-k routing, renormalised; dropless"

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        if getattr(hf_config, "sliding_window", None) is not None:
            raise UserError("Mixtral with sliding_window set is not supported yet")
