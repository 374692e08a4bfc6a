"""Qwen2.5-VL's tiny test model: vision depth 2 (block 1 full attention, block 0 in windows
of 2 x 2 merged tokens), hidden 32, MLP 60 (padded to 64 in Megatron: conversion/vit.py
``padded_ffn``), patch 4; a 2-layer Qwen2 language model, hidden 64.

Vision-language families are not in the text-only conformance suite (they need images);
tests/unit_tests/models/test_vision_language.py runs this one.
"""

VISION = dict(
    depth=2, hidden_size=32, intermediate_size=60, num_heads=2, patch_size=4,
    spatial_merge_size=2, temporal_patch_size=2, window_size=16, out_hidden_size=64,
    fullatt_block_indexes=[1], in_channels=3,
)  # fmt: skip
TEXT = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    bos_token_id=2, eos_token_id=3,
)  # fmt: skip
# The token ids the tiny processor's tokenizer gives its special tokens (tests build it).
TOKENS = dict(
    vision_start_token_id=90, vision_end_token_id=91, image_token_id=92, video_token_id=93
)

TINY = {
    "base": dict(text_config=TEXT, vision_config=VISION, tie_word_embeddings=False, **TOKENS),
    "tied": dict(text_config=TEXT, vision_config=VISION, tie_word_embeddings=True, **TOKENS),
}
