"""MoE config conventions that several HF families share.

Qwen1.5/2-MoE and Qwen3-MoE write their experts and routing the same way: the
table QWEN_MOE_CONFIG, ``norm_topk_prob`` and the choice of MoE layers by
``mlp_only_layers`` / ``decoder_sparse_step``. SparseStepMoeBridge reads and
writes those; each of the families derives from it and adds its own tables.
"""

from __future__ import annotations

from megabridge.conversion.family import COMMON_CONFIG, FamilyBridge
from megabridge.errors import UserError

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


# ------------------------------------------------------------ sigmoid group-limited routing
# DeepSeek-V3's router, also GLM-4.5/4.6's: sigmoid scores, a correction bias that only
# picks the experts, groups ranked by the sum of their top-2 scores, the chosen weights
# renormalised and multiplied by routed_scaling_factor; the first first_k_dense_replace
# layers dense; n_shared_experts shared experts of moe_intermediate_size each.


def read_grouped_sigmoid_routing(name: str, hf_config, cfg) -> None:
    """The MoE layout and group-limited routing of ``hf_config`` into ``cfg``."""
    if not getattr(hf_config, "norm_topk_prob", True):
        # Megatron-Core's sigmoid router always renormalises the top-k weights.
        raise UserError(f"{name} with norm_topk_prob=False is not supported yet")
    dense = hf_config.first_k_dense_replace or 0
    cfg.moe_layer_freq = [0] * dense + [1] * (cfg.num_layers - dense) if dense else None
    shared = hf_config.n_shared_experts or 0
    cfg.moe_shared_expert_intermediate_size = shared * cfg.moe_ffn_hidden_size or None
    if (hf_config.n_group or 1) > 1:
        if cfg.moe_router_topk != 2 * hf_config.topk_group:
            # transformers ranks groups by their top-2 scores, Megatron-Core by their
            # top (topk / topk_group): the same only when topk = 2 x topk_group.
            raise UserError(
                f"{name} group-limited routing needs num_experts_per_tok = 2 x topk_group "
                f"(got {cfg.moe_router_topk} and {hf_config.topk_group})"
            )
        cfg.moe_router_num_groups = hf_config.n_group
        cfg.moe_router_group_topk = hf_config.topk_group


def grouped_sigmoid_routing_fields(name: str, cfg) -> dict:
    """Inverse of read_grouped_sigmoid_routing: the HF config fields."""
    pattern = cfg.moe_layer_freq or [1] * cfg.num_layers
    dense = pattern.index(1) if 1 in pattern else cfg.num_layers
    if pattern != [0] * dense + [1] * (cfg.num_layers - dense):
        raise UserError(f"{name} has dense layers first, then MoE layers only")
    shared = cfg.moe_shared_expert_intermediate_size or 0
    return dict(
        first_k_dense_replace=dense,
        n_shared_experts=shared // cfg.moe_ffn_hidden_size,
        n_group=cfg.moe_router_num_groups or 1,
        topk_group=cfg.moe_router_group_topk or 1,
        norm_topk_prob=True,
    )
