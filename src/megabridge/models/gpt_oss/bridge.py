"""GPT-OSS (GptOssForCausalLM: gpt-oss-20b, gpt-oss-120b): attention sinks, alternating
sliding-window / full layers, YaRN, biases everywhere, and MoE experts with a clamped SwiGLU
stored stacked (all experts of a layer in one tensor, gate/up columns interleaved).

YaRN's attention factor (transformers' scale on cos and sin) is resolved from the rope
parameters when read, as rotary_attention_scaling; the export writes the parameters back.
"""

from megabridge.conversion import blocks
from megabridge.conversion.family import COMMON_CONFIG, LLAMA_LIKE, FamilyBridge, read_window_layers
from megabridge.conversion.registry import register_bridge
from megabridge.errors import UserError
from megabridge.models.rope import YARN, rope_type, yarn_attention_factor

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
        "attention sinks, alternating sliding / full layers, YaRN (torch spec); biased experts "
        "with clamped SwiGLU, whole on each TP rank (expert TP 1); MXFP4 releases dequantized "
        "to bf16 on import, as transformers does: exports write bf16 (or --dtype), not MXFP4"
    )

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        if not hf_config.attention_bias:
            raise UserError("GPT-OSS with attention_bias=False is not supported yet")
        cfg.ffn_hidden_size = hf_config.intermediate_size
        read_window_layers(cls.NAME, hf_config, cfg)
        if rope_type(cfg.rope_scaling) == YARN:
            cfg.rotary_attention_scaling = yarn_attention_factor(cfg.rope_scaling)

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        data["intermediate_size"] = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
        layers = range(cfg.num_layers)
        data["layer_types"] = [SLIDING if cfg.window_of_layer(i) else FULL for i in layers]
        data["sliding_window"] = cfg.sliding_window
        if (cfg.rotary_attention_scaling or 1.0) != yarn_attention_factor(cfg.rope_scaling):
            if rope_type(cfg.rope_scaling) != YARN:
                raise UserError("GPT-OSS scales attention after RoPE only with YaRN")
            data["rope_parameters"]["attention_factor"] = cfg.rotary_attention_scaling
