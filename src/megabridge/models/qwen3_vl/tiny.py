"""Qwen3-VL's tiny test model: vision depth 3, hidden 32, patch 4, a 4 x 4 learned position
table, DeepStack from blocks 0 and 2 (into LM layers 0 and 1); a 4-layer Qwen3 language
model, hidden 64, interleaved M-RoPE (4 layers: PP=2 keeps both DeepStack layers on stage 0).

Vision-language families are not in the text-only conformance suite (they need images);
tests/unit_tests/models/test_qwen3_vl.py runs this one.
"""

VISION = dict(
    depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
    spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16,
    deepstack_visual_indexes=[0, 2], in_channels=3,
)  # fmt: skip
ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
        "mrope_interleaved": True}  # fmt: skip
TEXT = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
    rms_norm_eps=1e-6, rope_parameters=ROPE, bos_token_id=2, eos_token_id=3,
)  # fmt: skip
# The token ids the tiny processor's tokenizer gives its special tokens (tests build it).
TOKENS = dict(
    vision_start_token_id=90, vision_end_token_id=91, image_token_id=92, video_token_id=93
)

TINY = {
    "base": dict(text_config=TEXT, vision_config=VISION, tie_word_embeddings=False, **TOKENS),
    "tied": dict(text_config=TEXT, vision_config=VISION, tie_word_embeddings=True, **TOKENS),
}
