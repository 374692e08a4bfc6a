"""Qwen1.5-MoE / Qwen2-MoE: QKV biases, softmax top-k routing, a gated shared expert.

Routing: transformers softmaxes over all experts and keeps the top-k, divided
by their sum only with ``norm_topk_prob``. Megatron-Core with pre-softmax does
the first (softmax, then top-k); without it, it softmaxes over the top-k
logits, which equals the renormalised top-k. The shared expert's output is
scaled by sigmoid(shared_expert_gate(x)): Megatron's ``moe_shared_expert_gate``.
Which layers are MoE (``mlp_only_layers``, ``decoder_sparse_step``) becomes
``moe_layer_freq``.
"""

from megabridge.conversion.family import COMMON_CONFIG, FamilyBridge
from megabridge.conversion.mappings import QKV, GatedMLP, renames
from megabridge.conversion.registry import register_bridge
from megabridge.errors import UserError

LAYER = "decoder.layers.*"
HF_LAYER = "model.layers.*"
EXPERT = f"{LAYER}.mlp.experts.local_experts.*"
HF_EXPERT = f"{HF_LAYER}.mlp.experts.*"

MOE_CONFIG = {
    "moe_intermediate_size": "moe_ffn_hidden_size",
    "num_experts": "num_moe_experts",
    "num_experts_per_tok": "moe_router_topk",
    "router_aux_loss_coef": "moe_aux_loss_coeff",
}

ATTENTION = [
    *renames(
        {
            "embedding.word_embeddings.weight": "model.embed_tokens.weight",
            "decoder.final_layernorm.weight": "model.norm.weight",
            "output_layer.weight": "lm_head.weight",
            f"{LAYER}.input_layernorm.weight": f"{HF_LAYER}.input_layernorm.weight",
            f"{LAYER}.pre_mlp_layernorm.weight": f"{HF_LAYER}.post_attention_layernorm.weight",
            f"{LAYER}.self_attention.linear_proj.weight": f"{HF_LAYER}.self_attn.o_proj.weight",
        }
    ),
    QKV(
        f"{LAYER}.self_attention.linear_qkv.weight",
        tuple(f"{HF_LAYER}.self_attn.{p}_proj.weight" for p in "qkv"),
    ),
]
QKV_BIAS = [
    QKV(
        f"{LAYER}.self_attention.linear_qkv.bias",
        tuple(f"{HF_LAYER}.self_attn.{p}_proj.bias" for p in "qkv"),
    ),
]
# Dense layers (mlp_only_layers) and the routed experts.
MLP_AND_EXPERTS = [
    *renames(
        {
            f"{LAYER}.mlp.linear_fc2.weight": f"{HF_LAYER}.mlp.down_proj.weight",
            f"{LAYER}.mlp.router.weight": f"{HF_LAYER}.mlp.gate.weight",
            f"{EXPERT}.linear_fc2.weight": f"{HF_EXPERT}.down_proj.weight",
        }
    ),
    GatedMLP(
        f"{LAYER}.mlp.linear_fc1.weight",
        (f"{HF_LAYER}.mlp.gate_proj.weight", f"{HF_LAYER}.mlp.up_proj.weight"),
    ),
    GatedMLP(
        f"{EXPERT}.linear_fc1.weight",
        (f"{HF_EXPERT}.gate_proj.weight", f"{HF_EXPERT}.up_proj.weight"),
    ),
]
SHARED_EXPERT = [
    *renames(
        {
            f"{LAYER}.mlp.shared_experts.linear_fc2.weight": f"{HF_LAYER}.mlp.shared_expert.down_proj.weight",
            f"{LAYER}.mlp.shared_experts.gate_weight": f"{HF_LAYER}.mlp.shared_expert_gate.weight",
        }
    ),
    GatedMLP(
        f"{LAYER}.mlp.shared_experts.linear_fc1.weight",
        (
            f"{HF_LAYER}.mlp.shared_expert.gate_proj.weight",
            f"{HF_LAYER}.mlp.shared_expert.up_proj.weight",
        ),
    ),
]


def moe_layer_freq(hf_config) -> list[int] | None:
    """1 per MoE layer, 0 per dense one, as transformers' Qwen MoE decoder layers decide."""
    dense = set(getattr(hf_config, "mlp_only_layers", None) or [])
    step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    pattern = [
        int(i not in dense and (i + 1) % step == 0) for i in range(hf_config.num_hidden_layers)
    ]
    return None if all(pattern) else pattern


def hf_layer_fields(cfg) -> dict:
    """Inverse of moe_layer_freq: the dense layers listed one by one."""
    pattern = cfg.moe_layer_freq or [1] * cfg.num_layers
    return {
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, m in enumerate(pattern) if not m],
    }


def check_no_sliding_window(hf_config, family: str) -> None:
    if getattr(hf_config, "use_sliding_window", False):
        raise UserError(f"{family} with use_sliding_window=True is not supported yet")


@register_bridge
class Qwen2MoeBridge(FamilyBridge):
    family = "qwen2_moe"
    architectures = ("Qwen2MoeForCausalLM",)
    hf_model_type = "qwen2_moe"
    CONFIG = {
        **COMMON_CONFIG,
        **MOE_CONFIG,
        "shared_expert_intermediate_size": "moe_shared_expert_intermediate_size",
        "qkv_bias": "add_qkv_bias",
    }
    MEGATRON_FIXED = dict(
        normalization="RMSNorm",
        activation="swiglu",
        position_embedding_type="rope",
        add_bias_linear=False,
        moe_shared_expert_gate=True,
        moe_router_score_function="softmax",
    )
    HF_FIXED = dict(hidden_act="silu", use_sliding_window=False)
    MAPPINGS = [*ATTENTION, *QKV_BIAS, *MLP_AND_EXPERTS, *SHARED_EXPERT]
    PARALLELISM = ("TP", "PP", "EP")
    NOTES = "gated shared expert; norm_topk_prob; mlp_only_layers / decoder_sparse_step"

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        check_no_sliding_window(hf_config, "Qwen2-MoE")
        cfg.moe_router_pre_softmax = not hf_config.norm_topk_prob
        cfg.moe_layer_freq = moe_layer_freq(hf_config)

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        data["norm_topk_prob"] = not cfg.moe_router_pre_softmax
        data.update(hf_layer_fields(cfg))
