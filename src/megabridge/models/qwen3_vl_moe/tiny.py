"""Qwen3-VL-MoE's tiny test model: Qwen3-VL's tiny tower (models/qwen3_vl/tiny.py) in front
of a 4-layer Qwen3-MoE language model: 4 experts of 24, top-2, layer 1 dense (128). The
expert sizes make every stacked tensor's orientation plain from its shape ([E, 64, 48]
vs [E, 48, 64]: the released and transformers 5's layouts).

tests/unit_tests/models/test_qwen3_vl.py runs it.
"""

from megabridge.models.qwen3_vl.tiny import TEXT, TOKENS, VISION

MOE_TEXT = dict(
    TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, mlp_only_layers=[1],
    decoder_sparse_step=1, router_aux_loss_coef=0.001,
)  # fmt: skip

TINY = {
    "base": dict(text_config=MOE_TEXT, vision_config=VISION, tie_word_embeddings=False, **TOKENS),
}
