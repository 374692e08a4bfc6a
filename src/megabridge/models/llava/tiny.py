"""LLaVA's tiny test models: a 2-layer ViT (hidden 32, 16 x 16 images of 4 x 4 patches)
and a 2-layer language model (hidden 64) of a supported text family.

* ``base``: CLIP (class token, quick_gelu) + Llama, the hidden states of the next-to-last
  layer without the class token (LLaVA 1.5's choice): 16 image tokens.
* ``siglip_qwen2``: SigLIP (patch bias, pooling head carried, an MLP of 60 units that the
  Megatron-Core layers pad to 64) + Qwen2 with tied embeddings, two feature layers
  concatenated, every position kept ("full"): 16 image tokens.
* ``pixtral_mistral``: Pixtral-12B's shape: a Pixtral tower (each image at its own size, up
  to 32 pixels a side, every 4 x 4 patch a token; models/mistral3/tower.py) + Mistral, with
  the projector's biases.

Vision-language families are not in the text-only conformance suite (they need images);
tests/unit_tests/models/test_llava.py runs these.
"""

from megabridge.conversion.tiny import DENSE

VIT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    image_size=16, patch_size=4, num_channels=3,
)  # fmt: skip
TEXT = dict(DENSE, vocab_size=96, max_position_embeddings=512, bos_token_id=2, eos_token_id=3)
IMAGE_TOKEN_ID = 92  # "<image>" in the tiny processor's vocabulary (tests build it)

TINY = {
    "base": dict(
        text_config=dict(TEXT, model_type="llama"),
        vision_config=dict(VIT, model_type="clip_vision_model", projection_dim=16),
        image_token_index=IMAGE_TOKEN_ID, image_seq_length=16, tie_word_embeddings=False,
    ),
    "siglip_qwen2": dict(
        text_config=dict(TEXT, model_type="qwen2", tie_word_embeddings=True),
        vision_config=dict(VIT, model_type="siglip_vision_model", vision_use_head=True,
                           intermediate_size=60),
        image_token_index=IMAGE_TOKEN_ID, image_seq_length=16, tie_word_embeddings=True,
        vision_feature_layer=[-1, 1], vision_feature_select_strategy="full",
        projector_hidden_act="gelu_pytorch_tanh",
    ),
    "pixtral_mistral": dict(
        text_config=dict(TEXT, model_type="mistral", head_dim=32, sliding_window=None),
        vision_config=dict(VIT, model_type="pixtral", hidden_act="silu", image_size=32),
        image_token_index=IMAGE_TOKEN_ID, vision_feature_select_strategy="full",
    ),
}  # fmt: skip
