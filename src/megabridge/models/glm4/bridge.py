"""GLM-4 dense (GLM-4-0414: 9B, 32B; Glm4ForCausalLM).

Llama's attention with q/k/v biases and Phi-3's fused gate_up_proj ([gate; up], a plain
rename), plus two differences in the layer:

* four RMSNorms, Gemma's placement under GLM's names (blocks.sandwich_norms): the
  attention and MLP outputs are normed before each residual add;
* partial RoPE (half the head by default) on interleaved channel pairs: transformers
  repeats each frequency twice and rotates (x0, x1) -> (-x1, x0), Megatron-Core's
  ``rotary_interleaved``.
"""

from megabridge.conversion import blocks
from megabridge.conversion.family import COMMON_CONFIG, LLAMA_LIKE, FamilyBridge
from megabridge.conversion.registry import register_bridge


@register_bridge
class Glm4Bridge(FamilyBridge):
    family = "glm4"
    architectures = ("Glm4ForCausalLM",)
    hf_model_type = "glm4"
    NAME = "GLM-4"
    # attention_bias: biases on q, k and v only (o_proj never has one in transformers' GLM-4).
    CONFIG = {**COMMON_CONFIG, "attention_bias": "add_qkv_bias"}
    MEGATRON_FIXED = {**LLAMA_LIKE, "norm_placement": "pre_post", "rotary_interleaved": True}
    HF_FIXED = dict(hidden_act="silu")
    MAPPINGS = [
        *blocks.embeddings_and_head(),
        *blocks.final_norm(),
        *blocks.sandwich_norms(),
        *blocks.attention(),
        *blocks.qkv_bias(),
        *blocks.fused_gated_mlp(),
    ]
    NOTES = "q/k/v biases; fused gate_up; four norms a layer; partial interleaved RoPE (torch spec)"

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        cfg.rotary_percent = float(hf_config.rope_parameters.get("partial_rotary_factor", 1.0))

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        data["rope_parameters"]["partial_rotary_factor"] = cfg.rotary_percent
        data["attention_bias"] = cfg.add_qkv_bias
        # Glm4Config's default pad id (151329) is outside a smaller vocabulary: none was trained.
        data.setdefault("pad_token_id", None)
