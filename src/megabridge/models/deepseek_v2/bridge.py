"""DeepSeek-V2 and V2-Lite (and DeepSeek-Coder-V2): multi-latent attention + softmax-routed MoE.

The layout (MLA, dense first layers, shared experts) is conversion/mla_moe.py's;
V2-Lite has no query low-rank projection (q_lora_rank null: q_proj directly).
Routing, as transformers' DeepseekV2TopkRouter: softmax over all experts in fp32,
the top k kept without renormalising, times ``routed_scaling_factor``
(Megatron: pre-softmax). ``topk_method`` "greedy" (V2-Lite) picks among all
experts; "group_limited_greedy" (V2) only within the ``topk_group`` groups with the
best single score (ModelConfig.moe_router_group_score="max", models/hooks.py).
"""

from megabridge.conversion.mla_moe import MLA_MOE_FIXED, MlaMoeBridge, mla_moe_mappings
from megabridge.conversion.registry import register_bridge
from megabridge.errors import UserError

TOPK_METHODS = ("greedy", "group_limited_greedy")


@register_bridge
class DeepseekV2Bridge(MlaMoeBridge):
    family = "deepseek_v2"
    architectures = ("DeepseekV2ForCausalLM",)
    hf_model_type = "deepseek_v2"
    NAME = "DeepSeek-V2"
    MEGATRON_FIXED = dict(
        **MLA_MOE_FIXED,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=True,
        # V2's expert-level balance loss, sequence-wise (V2-Lite: aux_loss_alpha 0.001, seq_aux).
        moe_router_load_balancing_type="seq_aux_loss",
        moe_aux_loss_coeff=1e-3,
    )
    HF_FIXED = dict(hidden_act="silu", attention_bias=False, norm_topk_prob=False)
    UNSUPPORTED = {
        **MlaMoeBridge.UNSUPPORTED,
        # transformers' DeepSeek-V2 router never renormalises; DeepSeek's own code does.
        "norm_topk_prob": "transformers ignores it and DeepSeek's code honours it",
    }
    MAPPINGS = mla_moe_mappings(expert_bias=False)
    NOTES = (
        "MLA (V2-Lite: no query low-rank); softmax top-k routing, greedy or group-limited "
        "(best score per group); shared experts; dense first layers"
    )

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        super().adjust_model_config(hf_config, cfg)
        method = hf_config.topk_method or "greedy"
        if method not in TOPK_METHODS:
            raise UserError(
                f"DeepSeek-V2 with topk_method={method!r} is not supported yet "
                f"(supported: {', '.join(TOPK_METHODS)})"
            )
        if method == "group_limited_greedy":
            cfg.moe_router_num_groups = hf_config.n_group
            cfg.moe_router_group_topk = hf_config.topk_group
            cfg.moe_router_group_score = "max"

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        super().adjust_hf_config(cfg, data)
        grouped = cfg.moe_router_num_groups is not None
        if grouped and cfg.moe_router_group_score != "max":
            raise UserError("DeepSeek-V2 ranks expert groups by their best score (max) only")
        data.update(
            topk_method="group_limited_greedy" if grouped else "greedy",
            n_group=cfg.moe_router_num_groups or 1,
            topk_group=cfg.moe_router_group_topk or 1,
        )
