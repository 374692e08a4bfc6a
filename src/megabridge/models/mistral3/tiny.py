"""Mistral 3's tiny test model: a 2-layer Pixtral tower (hidden 32, 2 heads, MLP 60: padded
to 64 in Megatron, conversion/vit.py ``padded_ffn``; 4 x 4 patches, 2 x 2 merged into a token)
and a 2-layer Mistral language model (hidden 64, head_dim 32 != 64 / 4 as Mistral Small's).

* ``base``: the last layer's features, untied embeddings (as Mistral Small 3.1).
* ``tied``: the first layer's features (the second layer runs for none), tied embeddings.

Vision-language families are not in the text-only conformance suite (they need images);
tests/unit_tests/models/test_mistral3.py runs these.
"""

from megabridge.conversion.tiny import DENSE

VISION = dict(
    model_type="pixtral", hidden_size=32, intermediate_size=60, num_hidden_layers=2,
    num_attention_heads=2, patch_size=4, image_size=64, hidden_act="silu",
)  # fmt: skip
TEXT = dict(
    DENSE, model_type="mistral", vocab_size=96, head_dim=32, max_position_embeddings=512,
    sliding_window=None, bos_token_id=2, eos_token_id=3,
)  # fmt: skip
# "[IMG]", "[IMG_BREAK]", "[IMG_END]" in the tiny processor's vocabulary (tests build it)
IMAGE_TOKEN_ID, IMAGE_BREAK_ID, IMAGE_END_ID = 92, 93, 94

TINY = {
    "base": dict(
        text_config=TEXT, vision_config=VISION, image_token_index=IMAGE_TOKEN_ID,
        spatial_merge_size=2, tie_word_embeddings=False,
    ),
    "tied": dict(
        text_config=dict(TEXT, tie_word_embeddings=True), vision_config=VISION,
        image_token_index=IMAGE_TOKEN_ID, spatial_merge_size=2, tie_word_embeddings=True,
        vision_feature_layer=1,
    ),
}  # fmt: skip
