"""GPT-OSS (GptOssForCausalLM: gpt-oss-20b, gpt-oss-120b): attention sinks, alternating
sliding-window / full layers, YaRN, biases everywhere, and MoE experts with a clamped SwiGLU
stored stacked (all experts of a layer in one tensor, gate/up columns interleaved)."""

from megabridge.conversion import blocks
from megabridge.conversion.family import COMMON_CONFIG, LLAMA_LIKE, FamilyBridge
from megabridge.conversion.registry import register_bridge
from megabridge.errors import UserError

SLIDING, FULL = "sliding_attention", "full_attention"


@register_bridge
class GptOssBridge(FamilyBridge):
    family = "gpt_oss"
    architectures = ("GptOssForCausalLM",)
    hf_model_type = "gpt_oss"
    NAME = "GPT-OSS"
    CONFIG = {
        **COMMON_CONFIG,
        "intermediate_size": "moe_ffn_hidden_size",  # every layer is MoE: the expert size
        "num_local_experts": "num_moe_experts",
        "num_experts_per_tok": "moe_router_topk",
        "router_aux_loss_coef": "moe_aux_loss_coeff",
        "sliding_window": "sliding_window",
        "swiglu_alpha": "swiglu_alpha",
        "swiglu_limit": "activation_clamp",
    }
    MEGATRON_FIXED = {
        **LLAMA_LIKE,
        "add_bias_linear": True,  # q/k/v, o_proj, router and experts all have biases
        "attention_sinks": True,
        "glu_linear_offset": 1.0,  # (up + 1) * gate * sigmoid(alpha * gate)
        # top-k on the router logits, then a softmax over the k (Megatron without pre-softmax)
        "moe_router_pre_softmax": False,
        "moe_router_score_function": "softmax",
    }
    HF_FIXED = dict(hidden_act="silu", attention_bias=True)
    MAPPINGS = [
        *blocks.embeddings_and_head(),
        *blocks.final_norm(),
        *blocks.pre_norms(),
        *blocks.attention(),
        *blocks.qkv_bias(),
        *blocks.output_projection_bias(),
        *blocks.attention_sinks(),
        *blocks.router(f"{blocks.HF_MLP}.router", bias=True),
        *blocks.stacked_experts(),
    ]
    PARALLELISM = ("TP", "PP", "EP")
    NOTES = (
        "attention sinks, alternating sliding / full layers, YaRN (torch spec); the official "
        "MXFP4 experts are dequantized on import (to bf16, as transformers does): exports "
        "write bf16 (or --dtype), never MXFP4"
    )

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        if not hf_config.attention_bias:
            raise UserError("GPT-OSS with attention_bias=False is not supported yet")
        cfg.ffn_hidden_size = hf_config.intermediate_size
        kinds = list(hf_config.layer_types)
        unknown = sorted(set(kinds) - {SLIDING, FULL})
        if unknown:
            raise UserError(f"GPT-OSS with layer_types {unknown} is not supported yet")
        if hf_config.sliding_window is None or SLIDING not in kinds:
            cfg.sliding_window, cfg.sliding_window_layers = None, None
        else:
            cfg.sliding_window_layers = [i for i, kind in enumerate(kinds) if kind == SLIDING]

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        data["intermediate_size"] = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
        layers = range(cfg.num_layers)
        data["layer_types"] = [SLIDING if cfg.window_of_layer(i) else FULL for i in layers]
        data.setdefault("sliding_window", None)
