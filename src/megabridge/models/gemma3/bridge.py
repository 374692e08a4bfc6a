"""Gemma 3 text (Gemma3ForCausalLM): Gemma 2 plus per-head (1 + w) QK norms, local layers with
their own RoPE theta, global layers with scalable RoPE; no attention soft-capping."""

from megabridge.conversion import blocks
from megabridge.conversion.family import TextTower
from megabridge.conversion.registry import register_bridge
from megabridge.errors import UserError
from megabridge.models.gemma2.bridge import Gemma2Bridge
from megabridge.models.rope import rope_type


@register_bridge
class Gemma3Bridge(Gemma2Bridge):
    """Gemma 2 plus QK norm and per-kind RoPE, minus attention soft-capping."""

    family = "gemma3"
    # Gemma3ForConditionalGeneration is models/gemma3_vl's; TEXT_TOWERS reads it text-only.
    architectures = ("Gemma3ForCausalLM",)
    hf_model_type = "gemma3_text"
    # transformers' Gemma 3 attention never reads attn_logit_softcapping: neither do we.
    CONFIG = {k: v for k, v in Gemma2Bridge.CONFIG.items() if k != "attn_logit_softcapping"}
    MEGATRON_FIXED = {**Gemma2Bridge.MEGATRON_FIXED, "qk_layernorm": True}
    MAPPINGS = [*Gemma2Bridge.MAPPINGS, *blocks.qk_norm()]
    # 4B and up on the Hub: text + vision. Hub files (transformers 4.x names, also written by
    # 5.x) keep the language model under language_model.*; 5.x's in-memory names under
    # model.language_model.*. The vision tower and projector are left out.
    TEXT_TOWERS = (
        TextTower(
            architecture="Gemma3ForConditionalGeneration",
            config_key="text_config",
            renames={
                "language_model.model.": "model.",
                "language_model.lm_head.": "lm_head.",
                "model.language_model.": "model.",
            },
            ignored=(
                "vision_tower.",
                "multi_modal_projector.",
                "model.vision_tower.",
                "model.multi_modal_projector.",
            ),
        ),
    )
    NOTES = (
        "tied embeddings; sliding window with its own RoPE theta, global RoPE scaling (torch "
        "spec); Gemma3ForConditionalGeneration with --text-only (or a text recipe): read as "
        "its language model (vision tower left out), exported as a text-only Gemma3ForCausalLM"
    )

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        super().adjust_model_config(hf_config, cfg)
        # rope_parameters: {"full_attention": {...}, "sliding_attention": {...}}
        full = dict(hf_config.rope_parameters["full_attention"])
        local = hf_config.rope_parameters["sliding_attention"]
        if rope_type(local) != "default":
            raise UserError(
                f"Gemma3 with sliding-window rope_type {rope_type(local)!r} is not supported yet"
            )
        cfg.rotary_base = float(full.pop("rope_theta"))
        cfg.rope_scaling = full if rope_type(full) != "default" else {}
        cfg.local_rotary_base = float(local["rope_theta"])
        cfg.attn_logit_softcap = None

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        if cfg.attn_logit_softcap is not None:
            raise UserError("Gemma3 has no attention soft-capping; attn_logit_softcap must be None")
        super().adjust_hf_config(cfg, data)
        del data["attn_logit_softcapping"]
        local = cfg.local_rotary_base or cfg.rotary_base
        data["rope_parameters"] = {
            "full_attention": {"rope_theta": cfg.rotary_base, "rope_type": "default", **cfg.rope_scaling},
            "sliding_attention": {"rope_theta": local, "rope_type": "default"},
        }  # fmt: skip
