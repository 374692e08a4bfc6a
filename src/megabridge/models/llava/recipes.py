"""LLaVA recipes: SFT and LoRA on chat JSONL with images (dataset.type=sft, padded; the
processor resizes every image to the tower's size). Point checkpoint.pretrained_checkpoint at
the local HF folder (its processor renders the data)."""

from megabridge.models.llava import tiny
from megabridge.models.llava.bridge import LlavaBridge
from megabridge.recipes import as_lora, sized, tiny_vlm_finetune, vlm_finetune

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


def llava_tiny_finetune_config():
    """A tiny LLaVA (tests, smoke runs): set checkpoint.pretrained_checkpoint, dataset.path."""
    return tiny_vlm_finetune("llava_tiny_sft", sized(LlavaBridge, tiny.TINY["base"]))


def llava_tiny_lora_config():
    """LoRA of the tiny LLaVA's language model (tests, smoke runs)."""
    return as_lora(llava_tiny_finetune_config(), "llava_tiny_lora")


def llava_1_5_7b_finetune_config():
    """SFT of LLaVA 1.5 7B, TP=2 on 2 GPUs: set checkpoint.pretrained_checkpoint and
    dataset.path."""
    cfg = vlm_finetune("llava_1_5_7b_sft", sized(LlavaBridge, SIZES["llava_1_5_7b"]))
    cfg.model.tensor_model_parallel_size = 2
    return cfg


def llava_1_5_7b_lora_config():
    """LoRA of LLaVA 1.5 7B's language model on one GPU (vision tower frozen)."""
    cfg = as_lora(llava_1_5_7b_finetune_config(), "llava_1_5_7b_lora")
    cfg.model.tensor_model_parallel_size = 1
    return cfg
