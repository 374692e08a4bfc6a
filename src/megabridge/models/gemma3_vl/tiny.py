"""Gemma 3 multimodal's tiny test model: a 1-layer SigLIP (hidden 32, 16 x 16 images of
4 x 4 patches, pooled to 4 image tokens) and Gemma 3's tiny 4-layer language model with a
sliding window of 8 (models/gemma3/tiny.py), so that an image's tokens reach past it.

Vision-language families are not in the text-only conformance suite (they need images);
tests/unit_tests/models/test_gemma3_vl.py runs this one.
"""

from megabridge.models.gemma3.tiny import BASE

VISION = dict(
    model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=2, image_size=16, patch_size=4, num_channels=3, vision_use_head=False,
)  # fmt: skip
# The ids the tiny processor's tokenizer gives its image tokens (tests build it).
TOKENS = dict(boi_token_index=250, eoi_token_index=251, image_token_index=252)

TINY = {
    "base": dict(
        text_config=dict(BASE, sliding_window=4), vision_config=VISION, mm_tokens_per_image=4,
        tie_word_embeddings=True, **TOKENS,
    ),
}  # fmt: skip
