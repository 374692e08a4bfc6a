"""Mistral 7B (v0.1-v0.3) and Mistral NeMo: Llama's layout; v0.1 has a 4096-token sliding window."""

from megabridge.conversion.family import COMMON_CONFIG
from megabridge.conversion.registry import register_bridge
from megabridge.models.llama.bridge import LlamaBridge


@register_bridge
class MistralBridge(LlamaBridge):
    """Llama plus a sliding window."""

    family = "mistral"
    architectures = ("MistralForCausalLM",)
    hf_model_type = "mistral"
    CONFIG = {**COMMON_CONFIG, "sliding_window": "sliding_window"}
    HF_FIXED = dict(hidden_act="silu")
    NOTES = "sliding-window attention (v0.1); head_dim != hidden/heads (NeMo)"

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        # MistralConfig's default window is 4096: "none" has to be written out.
        data.setdefault("sliding_window", None)
