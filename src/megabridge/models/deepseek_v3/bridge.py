"""DeepSeek-V3 (R1, V3.1, Kimi-K2, Moonlight): multi-latent attention + sigmoid-routed MoE.

The layout (MLA, dense first layers, shared experts) is conversion/mla_moe.py's.
Routing: sigmoid scores; the correction bias (Megatron's ``expert_bias``) only
picks the experts; groups ranked by the sum of their top-2 scores (Megatron: top
topk/group_topk, so topk = 2 x topk_group; Kimi-K2 and Moonlight have one group);
weights renormalised and multiplied by ``routed_scaling_factor``.

Releases: the FP8 ones (DeepSeek-V3, Kimi-K2) are dequantized to bf16 while read
(conversion/quantized.py) and export in bf16 without quantization_config. Kimi-K2's
config.json says model_type "kimi_k2", which transformers does not know: it is read
as a DeepSeek-V3 config. The multi-token-prediction layer (layer num_hidden_layers,
61 in the releases), which transformers skips too, is skipped.
"""

from megabridge.conversion.mla_moe import MLA_MOE_FIXED, MlaMoeBridge, mla_moe_mappings
from megabridge.conversion.moe import read_grouped_sigmoid_routing
from megabridge.conversion.registry import register_bridge
from megabridge.errors import UserError


@register_bridge
class DeepseekV3Bridge(MlaMoeBridge):
    family = "deepseek_v3"
    architectures = ("DeepseekV3ForCausalLM",)
    hf_model_type = "deepseek_v3"
    HF_MODEL_TYPE_ALIASES = ("kimi_k2",)
    NAME = "DeepSeek-V3"
    MEGATRON_FIXED = dict(
        **MLA_MOE_FIXED,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_pre_softmax=False,
        # The paper's complementary sequence-wise balance loss (alpha = 1e-4) for training.
        moe_router_load_balancing_type="seq_aux_loss",
        moe_aux_loss_coeff=1e-4,
    )
    HF_FIXED = dict(
        hidden_act="silu", rope_interleave=True, attention_bias=False, norm_topk_prob=True
    )
    MAPPINGS = mla_moe_mappings(expert_bias=True)
    # The releases' multi-token-prediction module (layer 61), which transformers skips too.
    IGNORED_HF = (r".*\.rotary_emb\.inv_freq$", r"model\.layers\.61\.")
    NOTES = (
        "MLA; sigmoid group-limited routing with expert bias; shared expert; dense first "
        "layers; FP8 releases dequantized to bf16; Kimi-K2 (kimi_k2) and Moonlight too"
    )

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        super().adjust_model_config(hf_config, cfg)
        if not getattr(hf_config, "rope_interleave", True):
            # Megatron-Core's MLA always de-interleaves the RoPE channels first.
            raise UserError("DeepSeek-V3 with rope_interleave=False is not supported yet")
        read_grouped_sigmoid_routing(cls.display_name(), hf_config, cfg)

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        super().adjust_hf_config(cfg, data)
        data.update(
            n_group=cfg.moe_router_num_groups or 1, topk_group=cfg.moe_router_group_topk or 1
        )
