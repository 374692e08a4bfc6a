"""Qwen1.5-MoE / Qwen2-MoE: QKV biases, softmax top-k routing, a gated shared expert.

Routing as in SparseStepMoeBridge. The shared expert's output is scaled by
sigmoid(shared_expert_gate(x)): Megatron's ``moe_shared_expert_gate``.
"""

from megabridge.conversion import blocks
from megabridge.conversion.family import LLAMA_LIKE
from megabridge.conversion.moe import QWEN_MOE_CONFIG, SparseStepMoeBridge
from megabridge.conversion.registry import register_bridge


@register_bridge
class Qwen2MoeBridge(SparseStepMoeBridge):
    family = "qwen2_moe"
    architectures = ("Qwen2MoeForCausalLM",)
    hf_model_type = "qwen2_moe"
    NAME = "Qwen2-MoE"
    CONFIG = {
        **QWEN_MOE_CONFIG,
        "shared_expert_intermediate_size": "moe_shared_expert_intermediate_size",
        "qkv_bias": "add_qkv_bias",
    }
    MEGATRON_FIXED = {
        **LLAMA_LIKE,
        "moe_shared_expert_gate": True,
        "moe_router_score_function": "softmax",
    }
    HF_FIXED = dict(hidden_act="silu", use_sliding_window=False)
    UNSUPPORTED = {"use_sliding_window": "windows on the layers from max_window_layers on only"}
    MAPPINGS = [
        *blocks.embeddings_and_head(),
        *blocks.final_norm(),
        *blocks.pre_norms(),
        *blocks.attention(),
        *blocks.qkv_bias(),
        *blocks.gated_mlp(),  # the dense layers (mlp_only_layers)
        *blocks.router(),
        *blocks.routed_experts(),
        *blocks.shared_experts(
            f"{blocks.HF_MLP}.shared_expert", f"{blocks.HF_MLP}.shared_expert_gate"
        ),
    ]
    NOTES = "gated shared expert; norm_topk_prob; mlp_only_layers / decoder_sparse_step"
