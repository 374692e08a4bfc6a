"""LLaVA recipes at the released sizes. Training a vision-language model is not supported
yet (issue 14): these recipes describe the layout and the train command refuses them in
one line."""

from megabridge.models.llava.bridge import LlavaBridge
from megabridge.recipes import finetune, sized

# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 x 336 (576 image tokens) + Vicuna 7B
    "llava_1_5_7b": dict(
        image_token_index=32000, projector_hidden_act="gelu", tie_word_embeddings=False,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        text_config=dict(model_type="llama", max_position_embeddings=4096, rms_norm_eps=1e-05,
                         vocab_size=32064),
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, image_size=336,
                           intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                           patch_size=14, projection_dim=768),
    ),
}  # fmt: skip


def llava_1_5_7b_finetune_config():
    """SFT of LLaVA 1.5 7B, TP=2 on 2 GPUs (not supported yet: training refuses it)."""
    cfg = finetune("llava_1_5_7b_sft", sized(LlavaBridge, SIZES["llava_1_5_7b"]))
    cfg.model.tensor_model_parallel_size = 2
    return cfg
