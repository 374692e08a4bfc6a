"""MoE config conventions that several HF families share.

Qwen1.5/2-MoE and Qwen3-MoE write their experts and routing the same way: the
table QWEN_MOE_CONFIG, ``norm_topk_prob`` and the choice of MoE layers by
``mlp_only_layers`` / ``decoder_sparse_step``. SparseStepMoeBridge reads and
writes those; each of the families derives from it and adds its own tables.
"""

from __future__ import annotations

from megabridge.conversion.family import COMMON_CONFIG, FamilyBridge

QWEN_MOE_CONFIG = {
    **COMMON_CONFIG,
    "moe_intermediate_size": "moe_ffn_hidden_size",
    "num_experts": "num_moe_experts",
    "num_experts_per_tok": "moe_router_topk",
    "router_aux_loss_coef": "moe_aux_loss_coeff",
}


def sparse_step_layer_freq(hf_config) -> list[int] | None:
    """1 per MoE layer, 0 per dense one, as transformers' Qwen MoE decoder layers decide
    (None: every layer MoE)."""
    dense = set(getattr(hf_config, "mlp_only_layers", None) or [])
    step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    pattern = [
        int(i not in dense and (i + 1) % step == 0) for i in range(hf_config.num_hidden_layers)
    ]
    return None if all(pattern) else pattern


def sparse_step_fields(cfg) -> dict:
    """Inverse of sparse_step_layer_freq: the dense layers listed one by one."""
    pattern = cfg.moe_layer_freq or [1] * cfg.num_layers
    return {
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, m in enumerate(pattern) if not m],
    }


class SparseStepMoeBridge(FamilyBridge):
    """Softmax top-k routing, renormalised only with ``norm_topk_prob``, on the layers that
    ``mlp_only_layers`` / ``decoder_sparse_step`` make MoE.

    transformers softmaxes over all experts and keeps the top k, divided by their sum
    only with ``norm_topk_prob``. Megatron-Core with pre-softmax does the first
    (softmax, then top-k); without it, it softmaxes over the top-k logits, which
    equals the renormalised top-k.
    """

    CONFIG = QWEN_MOE_CONFIG
    PARALLELISM = ("TP", "PP", "EP")

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        cfg.moe_router_pre_softmax = not hf_config.norm_topk_prob
        cfg.moe_layer_freq = sparse_step_layer_freq(hf_config)

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        data["norm_topk_prob"] = not cfg.moe_router_pre_softmax
        data.update(sparse_step_fields(cfg))
