"""Mixtral (8x7B, 8x22B): Llama attention, every MLP a softmax-routed mixture of experts.

transformers routes with softmax over all experts, keeps the top-k and divides
them by their sum. Megatron-Core's router without pre-softmax takes the top-k
logits and softmaxes over them: exp(l_i) / sum_topk exp(l_j), the same numbers.
"""

from megabridge.conversion.family import COMMON_CONFIG, FamilyBridge
from megabridge.conversion.mappings import QKV, GatedMLP, renames
from megabridge.conversion.registry import register_bridge
from megabridge.errors import UserError

LAYER = "decoder.layers.*"
HF_LAYER = "model.layers.*"
EXPERT = f"{LAYER}.mlp.experts.local_experts.*"
HF_EXPERT = f"{HF_LAYER}.block_sparse_moe.experts.*"


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
    MEGATRON_FIXED = dict(
        normalization="RMSNorm",
        activation="swiglu",
        position_embedding_type="rope",
        add_bias_linear=False,
        moe_router_pre_softmax=False,
        moe_router_score_function="softmax",
    )
    HF_FIXED = dict(hidden_act="silu", sliding_window=None, router_jitter_noise=0.0)
    MAPPINGS = [
        *renames(
            {
                "embedding.word_embeddings.weight": "model.embed_tokens.weight",
                "decoder.final_layernorm.weight": "model.norm.weight",
                "output_layer.weight": "lm_head.weight",
                f"{LAYER}.input_layernorm.weight": f"{HF_LAYER}.input_layernorm.weight",
                f"{LAYER}.pre_mlp_layernorm.weight": f"{HF_LAYER}.post_attention_layernorm.weight",
                f"{LAYER}.self_attention.linear_proj.weight": f"{HF_LAYER}.self_attn.o_proj.weight",
                f"{LAYER}.mlp.router.weight": f"{HF_LAYER}.block_sparse_moe.gate.weight",
                f"{EXPERT}.linear_fc2.weight": f"{HF_EXPERT}.w2.weight",
            }
        ),
        QKV(
            f"{LAYER}.self_attention.linear_qkv.weight",
            tuple(f"{HF_LAYER}.self_attn.{p}_proj.weight" for p in "qkv"),
        ),
        GatedMLP(
            f"{EXPERT}.linear_fc1.weight", (f"{HF_EXPERT}.w1.weight", f"{HF_EXPERT}.w3.weight")
        ),
    ]
    PARALLELISM = ("TP", "PP", "EP")
    NOTES = "softmax top-k routing, renormalised; dropless"

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        if getattr(hf_config, "sliding_window", None) is not None:
            raise UserError("Mixtral with sliding_window set is not supported yet")
