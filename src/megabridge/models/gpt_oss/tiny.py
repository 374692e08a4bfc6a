"""GPT-OSS's tiny test models (see conversion/tiny.py)."""

from megabridge.conversion.tiny import MOE

# transformers' defaults otherwise: YaRN (factor 32), sinks, sliding layer 0 / full layer 1,
# alpha 1.702 and limit 7. A low limit, so that the tiny random activations reach the clamp.
BASE = {**MOE, "intermediate_size": 32, "num_local_experts": 4, "head_dim": 16,
        "sliding_window": 8, "swiglu_limit": 0.5}  # fmt: skip

TINY = {
    "base": BASE,
    # Every layer full attention, plain RoPE (the sinks and the experts alone).
    "full_plain_rope": {**BASE, "layer_types": ["full_attention"] * 2,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 150000.0}},
}  # fmt: skip
