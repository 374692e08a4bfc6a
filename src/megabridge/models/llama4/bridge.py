"""Llama 4 text (Scout 17B-16E, Maverick 17B-128E: Llama4ForCausalLM, and the published
Llama4ForConditionalGeneration read as its language model).

Llama's attention and norms, plus, as transformers' modeling_llama4 computes them:

* RoPE on adjacent channel pairs (a complex product: Megatron-Core's rotary_interleaved),
  skipped on the NoPE layers (HF ``no_rope_layers``: 1 for a layer WITH RoPE);
* on the RoPE layers, attention within blocks of ``attention_chunk_size`` tokens (HF
  ``layer_types`` "chunked_attention") and, with ``use_qk_norm``, a weightless RMS norm
  of each query and key head after RoPE;
* on the NoPE layers, with ``attn_temperature_tuning``, queries scaled by a temperature
  that grows with the position (``floor_scale``, ``attn_scale``);
* MoE on the ``moe_layers`` (every ``interleave_moe_layer_step``-th): top-1 routing by
  the router logits, the chosen expert's sigmoid score multiplying the expert's INPUT
  (Megatron-Core's moe_apply_probs_on_input), and a shared expert of the experts' size;
  the experts stacked in HF (``experts.gate_up_proj`` [E, hidden, 2 * ffn], [gate | up]);
  dense layers of ``intermediate_size_mlp``.
"""

from megabridge.conversion import blocks
from megabridge.conversion.family import COMMON_CONFIG, LLAMA_LIKE, FamilyBridge, TextTower
from megabridge.conversion.registry import register_bridge
from megabridge.errors import UserError

FEED_FORWARD = f"{blocks.HF_LAYER}.feed_forward"
FULL, CHUNKED = "full_attention", "chunked_attention"


@register_bridge
class Llama4Bridge(FamilyBridge):
    family = "llama4"
    architectures = ("Llama4ForCausalLM", "Llama4ForConditionalGeneration")
    hf_model_type = "llama4_text"
    NAME = "Llama 4"
    # intermediate_size is the experts' (and the shared expert's); the dense layers' is
    # intermediate_size_mlp.
    CONFIG = {
        **COMMON_CONFIG,
        "intermediate_size": "moe_ffn_hidden_size",
        "intermediate_size_mlp": "ffn_hidden_size",
        "num_local_experts": "num_moe_experts",
        "num_experts_per_tok": "moe_router_topk",
        "router_aux_loss_coef": "moe_aux_loss_coeff",
    }
    MEGATRON_FIXED = {
        **LLAMA_LIKE,
        "rotary_interleaved": True,
        "moe_router_score_function": "sigmoid",
        "moe_apply_probs_on_input": True,
    }
    HF_FIXED = dict(hidden_act="silu", attention_bias=False)
    UNSUPPORTED = {"attention_bias": "biases on q/k/v and o_proj"}
    MAPPINGS = [
        *blocks.embeddings_and_head(),
        *blocks.final_norm(),
        *blocks.pre_norms(),
        *blocks.attention(),
        *blocks.gated_mlp(hf=FEED_FORWARD),  # the dense layers
        *blocks.router(hf=f"{FEED_FORWARD}.router"),
        *blocks.shared_experts(hf=f"{FEED_FORWARD}.shared_expert"),
        *blocks.stacked_gated_experts(f"{FEED_FORWARD}.experts"),
    ]
    # Scout and Maverick on the Hub: text + vision; the language model under language_model.*.
    TEXT_TOWERS = (
        TextTower(
            architecture="Llama4ForConditionalGeneration",
            config_key="text_config",
            renames={"language_model.model.": "model.", "language_model.lm_head.": "lm_head."},
            ignored=("vision_model.", "multi_modal_projector."),
        ),
    )
    PARALLELISM = ("TP", "PP", "EP")
    NOTES = (
        "interleaved MoE, top-1 sigmoid router on the expert input, shared expert; chunked "
        "attention, QK L2 norm on RoPE layers, NoPE layers with temperature tuning (torch "
        "spec); Llama4ForConditionalGeneration read as its language model, exported text-only"
    )

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        if cfg.moe_router_topk != 1:
            # transformers scales each chosen expert's input by its own sigmoid score;
            # Megatron-Core applies router weights to expert inputs with top-1 only.
            raise UserError(
                f"{cls.NAME} with num_experts_per_tok={cfg.moe_router_topk} is not supported yet"
            )
        layers = cfg.num_layers
        moe = set(hf_config.moe_layers)
        cfg.moe_layer_freq = [int(i in moe) for i in range(layers)]
        if all(cfg.moe_layer_freq):
            cfg.moe_layer_freq = None
        cfg.moe_shared_expert_intermediate_size = cfg.moe_ffn_hidden_size
        nope = [i for i, rope in enumerate(hf_config.no_rope_layers[:layers]) if not rope]
        cfg.no_rope_layers = nope or None
        kinds = list(hf_config.layer_types)
        unknown = sorted(set(kinds) - {FULL, CHUNKED})
        if unknown:
            raise UserError(f"{cls.NAME} layer_types {unknown} are not supported yet")
        chunked = [i for i, kind in enumerate(kinds) if kind == CHUNKED]
        if chunked and hf_config.attention_chunk_size:
            cfg.attention_chunk_size = int(hf_config.attention_chunk_size)
            cfg.chunked_attention_layers = chunked
        rope_layers = [i for i in range(layers) if i not in nope]
        if hf_config.use_qk_norm and rope_layers:
            cfg.qk_l2_norm_layers = rope_layers
        if hf_config.attn_temperature_tuning and nope:
            cfg.attn_temperature_scale = float(hf_config.attn_scale)
            cfg.attn_temperature_floor = int(hf_config.floor_scale)

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        layers = range(cfg.num_layers)
        if cfg.moe_shared_expert_intermediate_size != cfg.moe_ffn_hidden_size:
            raise UserError(f"{cls.NAME}'s shared expert is as large as a routed expert")
        pattern = cfg.moe_layer_freq or [1] * cfg.num_layers
        data["moe_layers"] = [i for i in layers if pattern[i]]
        nope = set(cfg.no_rope_layers or [])
        data["no_rope_layers"] = [int(i not in nope) for i in layers]
        data["layer_types"] = [CHUNKED if cfg.chunk_of_layer(i) else FULL for i in layers]
        data["attention_chunk_size"] = cfg.attention_chunk_size
        rope_layers = [i for i in layers if i not in nope]
        if cfg.qk_l2_norm_layers and cfg.qk_l2_norm_layers != rope_layers:
            raise UserError(f"{cls.NAME} has its QK norm on every RoPE layer or on none")
        data["use_qk_norm"] = bool(cfg.qk_l2_norm_layers)
        data["attn_temperature_tuning"] = cfg.attn_temperature_scale is not None
        if cfg.attn_temperature_scale is not None:
            data["attn_scale"] = cfg.attn_temperature_scale
            data["floor_scale"] = cfg.attn_temperature_floor
        # Llama4TextConfig's default pad id (None) and bos/eos (1, 2) fit any vocabulary.
