"""GLM-4's tiny test models (see conversion/tiny.py)."""

from megabridge.conversion.tiny import DENSE

# Glm4Config's default pad / eos ids (151329 ...) lie outside a tiny vocabulary.
BASE = {**DENSE, "head_dim": 16, "pad_token_id": 0, "eos_token_id": 1}

TINY = {
    # GLM-4-0414: q/k/v biases, RoPE on half of each head, interleaved.
    "base": BASE,
    # No biases, the whole head rotated.
    "no_bias_full_rotary": {**BASE, "attention_bias": False,
                            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                "partial_rotary_factor": 1.0}},
}  # fmt: skip

# GLM-4 norms what o_proj and down_proj produce (post_self_attn / post_mlp_layernorm), so
# scaling them changes no logit; gate_up_proj goes through SiLU first.
PERTURB_TENSOR = "layers.0.mlp.gate_up_proj"
