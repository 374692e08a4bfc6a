"""OLMo 3: OLMo 2 plus sliding-window layers (HF layer_types) with their own RoPE parameters
(rope_parameters per layer kind), as Gemma 3 has them."""

from megabridge.conversion.registry import register_bridge
from megabridge.errors import UserError
from megabridge.models.olmo2.bridge import Olmo2Bridge
from megabridge.models.rope import SUPPORTED_ROPE_TYPES, rope_type

FULL, SLIDING = "full_attention", "sliding_attention"


@register_bridge
class Olmo3Bridge(Olmo2Bridge):
    """OLMo 2 plus sliding-window layers and per-kind RoPE."""

    family = "olmo3"
    architectures = ("Olmo3ForCausalLM",)
    hf_model_type = "olmo3"
    NAME = "OLMo 3"
    CONFIG = {**Olmo2Bridge.CONFIG, "sliding_window": "sliding_window"}
    NOTES = (
        "OLMo 2 plus sliding-window layers with their own RoPE theta (torch spec); "
        "YaRN on the global layers not yet"
    )

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        unknown = sorted(set(hf_config.layer_types) - {FULL, SLIDING})
        if unknown:
            raise UserError(f"{cls.NAME} layer_types {unknown} are not supported yet")
        full = dict(hf_config.rope_parameters[FULL])
        local = hf_config.rope_parameters[SLIDING]
        for kind, params in ((FULL, full), (SLIDING, local)):
            supported = SUPPORTED_ROPE_TYPES if kind == FULL else ("default",)
            if rope_type(params) not in supported:
                raise UserError(
                    f"{cls.NAME} with rope_type {rope_type(params)!r} on its {kind} layers is "
                    f"not supported yet (supported there: {', '.join(supported)})"
                )
        cfg.rotary_base = float(full.pop("rope_theta"))
        cfg.rope_scaling = full if rope_type(full) != "default" else {}
        windowed = [i for i, kind in enumerate(hf_config.layer_types) if kind == SLIDING]
        if windowed and hf_config.sliding_window is not None:
            cfg.sliding_window_layers = windowed
            cfg.local_rotary_base = float(local["rope_theta"])
            return
        # transformers windows no layer: the sliding-kind layers (if any) attend fully.
        cfg.sliding_window = None
        if windowed and (float(local["rope_theta"]) != cfg.rotary_base or cfg.rope_scaling):
            raise UserError(
                f"{cls.NAME} with sliding_attention layers of their own RoPE but no "
                "sliding_window is not supported yet"
            )

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        windowed = [cfg.window_of_layer(i) is not None for i in range(cfg.num_layers)]
        data["layer_types"] = [SLIDING if w else FULL for w in windowed]
        data["sliding_window"] = cfg.sliding_window
        local = cfg.local_rotary_base or cfg.rotary_base
        data["rope_parameters"] = {
            FULL: {"rope_theta": cfg.rotary_base, "rope_type": "default", **cfg.rope_scaling},
            SLIDING: {"rope_theta": local, "rope_type": "default"},
        }
