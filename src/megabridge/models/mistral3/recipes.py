"""Mistral 3 recipes: SFT and LoRA on chat JSONL with images (dataset.type=sft, padded; the
processor keeps each image's aspect, at most image_size pixels a side). Point
checkpoint.pretrained_checkpoint at the local HF folder (its processor renders the data).

Mistral Small 3.1 24B on one 8xH200 node: TP=8 splits the language model's 32 query and 8
key/value heads one group a rank and the Pixtral tower's 16 heads two a rank (its patch conv
and projector are whole on every rank); per GPU about 3B parameters with their bf16 weights,
fp32 gradients and Adam state (~50 GB), the rest for activations at 4096 tokens.
"""

from megabridge.models.mistral3 import tiny
from megabridge.models.mistral3.bridge import Mistral3Bridge
from megabridge.recipes import as_lora, sized, tiny_vlm_finetune, vlm_finetune

# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    # mistralai/Mistral-Small-3.1-24B-Instruct-2503 (and -Base-2503, Small 3.2's 2506)
    "mistral_small_31_24b": dict(
        image_token_index=10, multimodal_projector_bias=False, projector_hidden_act="gelu",
        spatial_merge_size=2, vision_feature_layer=-1,
        text_config=dict(model_type="mistral", head_dim=128, hidden_size=5120,
                         intermediate_size=32768, max_position_embeddings=131072,
                         num_attention_heads=32, num_hidden_layers=40, num_key_value_heads=8,
                         rms_norm_eps=1e-05, rope_theta=1e9, sliding_window=None,
                         vocab_size=131072),
        vision_config=dict(model_type="pixtral", head_dim=64, hidden_act="silu",
                           hidden_size=1024, image_size=1540, intermediate_size=4096,
                           num_attention_heads=16, num_channels=3, num_hidden_layers=24,
                           patch_size=14, rope_theta=10000.0),
    ),
}  # fmt: skip


def mistral3_tiny_finetune_config():
    """A tiny Mistral 3 (tests, smoke runs): set checkpoint.pretrained_checkpoint, dataset.path."""
    return tiny_vlm_finetune("mistral3_tiny_sft", sized(Mistral3Bridge, tiny.TINY["base"]))


def mistral3_tiny_lora_config():
    """LoRA of the tiny Mistral 3's language model (tests, smoke runs)."""
    return as_lora(mistral3_tiny_finetune_config(), "mistral3_tiny_lora")


def mistral_small_31_24b_finetune_config():
    """SFT of Mistral Small 3.1 24B with images on one 8xH200 node (TP=8): set
    checkpoint.pretrained_checkpoint and dataset.path."""
    model = sized(Mistral3Bridge, SIZES["mistral_small_31_24b"])
    cfg = vlm_finetune("mistral_small_31_24b_sft", model)
    cfg.model.tensor_model_parallel_size = 8
    return cfg


def mistral_small_31_24b_lora_config():
    """LoRA of Mistral Small 3.1 24B's language model on 2 GPUs (TP=2, vision tower frozen;
    48 GB of bf16 weights, 24 GB a GPU)."""
    cfg = as_lora(mistral_small_31_24b_finetune_config(), "mistral_small_31_24b_lora")
    cfg.model.tensor_model_parallel_size = 2
    return cfg
