"""Qwen2 / Qwen2.5: Llama's layout plus biases on the q, k and v projections (not on o_proj)."""

from megabridge.conversion import blocks
from megabridge.conversion.family import read_window_layers, write_window_layers
from megabridge.conversion.registry import register_bridge
from megabridge.models.llama.bridge import LlamaBridge


@register_bridge
class Qwen2Bridge(LlamaBridge):
    """Llama plus q/k/v biases."""

    family = "qwen2"
    architectures = ("Qwen2ForCausalLM",)
    hf_model_type = "qwen2"
    UNSUPPORTED = {}  # transformers' Qwen2 has no o_proj or MLP biases to refuse
    MEGATRON_FIXED = {**LlamaBridge.MEGATRON_FIXED, "add_qkv_bias": True}
    HF_FIXED = dict(hidden_act="silu", use_sliding_window=False)
    MAPPINGS = [*LlamaBridge.MAPPINGS, *blocks.qkv_bias()]
    NOTES = "q/k/v biases; tied embeddings (0.5B-3B); sliding-window layers (use_sliding_window, max_window_layers)"

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        # use_sliding_window puts windows on the layers from max_window_layers on
        # (transformers' layer_types); released Qwen2/2.5/3 checkpoints all have it off.
        read_window_layers(cls.display_name(), hf_config, cfg)

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        write_window_layers(cfg, data)
