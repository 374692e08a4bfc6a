"""Qwen2.5-VL recipes: SFT and LoRA on chat JSONL with images (dataset.type=sft, padded).

Point checkpoint.pretrained_checkpoint at the local HF folder (its processor renders the
data); the architecture is then read from it. The language model is split by TP, and so
are the vision tower's blocks (the tower sits on the first pipeline stage); the larger sizes
take TP=8 within a node (72B: two 8xH200 nodes, data-parallel 2).
"""

from megabridge.models.qwen2_5_vl import tiny
from megabridge.models.qwen2_5_vl.bridge import Qwen25VLBridge
from megabridge.recipes import as_lora, sized, tiny_vlm_finetune, vlm_finetune

_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
               spatial_merge_size=2, temporal_patch_size=2, window_size=112, in_chans=3, spatial_patch_size=14,
               fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", tokens_per_second=2)  # fmt: skip
_TOKENS = dict(vision_start_token_id=151652, vision_end_token_id=151653,
               image_token_id=151655, video_token_id=151656)  # fmt: skip
_ROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}


def _size(layers, hidden, ffn, heads, kv, vocab, tied, theta=1e6) -> dict:
    text = dict(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=ffn,
                num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                rms_norm_eps=1e-6, max_position_embeddings=128000,
                rope_parameters={**_ROPE, "rope_theta": theta})  # fmt: skip
    vision = dict(_VISION, out_hidden_size=hidden)
    return dict(text_config=text, vision_config=vision, tie_word_embeddings=tied, **_TOKENS)


# HF config.json fields of each release; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    "qwen25_vl_3b": _size(36, 2048, 11008, 16, 2, 151936, tied=True),
    "qwen25_vl_7b": _size(28, 3584, 18944, 28, 4, 152064, tied=False),
    "qwen25_vl_32b": _size(64, 5120, 27648, 40, 8, 152064, tied=False),
    "qwen25_vl_72b": _size(80, 8192, 29568, 64, 8, 152064, tied=False),
}


def _finetune(name: str, size: str, tp: int):
    cfg = vlm_finetune(name, sized(Qwen25VLBridge, SIZES[size]))
    cfg.model.tensor_model_parallel_size = tp
    return cfg


def qwen25_vl_tiny_finetune_config():
    """A tiny Qwen2.5-VL (tests, smoke runs): set checkpoint.pretrained_checkpoint, dataset.path."""
    return tiny_vlm_finetune("qwen25_vl_tiny_sft", sized(Qwen25VLBridge, tiny.TINY["base"]))


def qwen25_vl_tiny_lora_config():
    """LoRA of the tiny Qwen2.5-VL's language model (tests, smoke runs)."""
    return as_lora(qwen25_vl_tiny_finetune_config(), "qwen25_vl_tiny_lora")


def qwen25_vl_3b_finetune_config():
    """SFT of Qwen2.5-VL 3B on one GPU: set checkpoint.pretrained_checkpoint and dataset.path."""
    return _finetune("qwen25_vl_3b_sft", "qwen25_vl_3b", tp=1)


def qwen25_vl_3b_lora_config():
    """LoRA of Qwen2.5-VL 3B's language model on one GPU (vision tower frozen)."""
    return as_lora(qwen25_vl_3b_finetune_config(), "qwen25_vl_3b_lora")


def qwen25_vl_7b_finetune_config():
    """SFT of Qwen2.5-VL 7B on 2 GPUs (TP=2): set checkpoint.pretrained_checkpoint, dataset.path."""
    return _finetune("qwen25_vl_7b_sft", "qwen25_vl_7b", tp=2)


def qwen25_vl_7b_lora_config():
    """LoRA of Qwen2.5-VL 7B's language model on one GPU (vision tower frozen)."""
    cfg = as_lora(qwen25_vl_7b_finetune_config(), "qwen25_vl_7b_lora")
    cfg.model.tensor_model_parallel_size = 1
    return cfg


def qwen25_vl_32b_finetune_config():
    """SFT of Qwen2.5-VL 32B on 8 GPUs (TP=8): set checkpoint.pretrained_checkpoint, dataset.path."""
    return _finetune("qwen25_vl_32b_sft", "qwen25_vl_32b", tp=8)


def qwen25_vl_32b_lora_config():
    """LoRA of Qwen2.5-VL 32B's language model on 2 GPUs (TP=2, vision tower frozen)."""
    cfg = as_lora(qwen25_vl_32b_finetune_config(), "qwen25_vl_32b_lora")
    cfg.model.tensor_model_parallel_size = 2
    return cfg


def qwen25_vl_72b_finetune_config():
    """SFT of Qwen2.5-VL 72B across two 8xH200 nodes: TP=8, data-parallel 2, distributed optimizer."""
    cfg = _finetune("qwen25_vl_72b_sft", "qwen25_vl_72b", tp=8)
    # Per GPU: 9B language-model weights (bf16 + fp32 gradients: 54 GB), half of their Adam
    # state (54 GB) and the whole 0.7B tower; full recomputation keeps activations small.
    cfg.optimizer.use_distributed_optimizer = True
    cfg.model.recompute_granularity = "full"
    cfg.model.recompute_method, cfg.model.recompute_num_layers = "uniform", 1
    return cfg


def qwen25_vl_72b_lora_config():
    """LoRA of Qwen2.5-VL 72B's language model on 4 GPUs (TP=4, vision tower frozen)."""
    cfg = as_lora(qwen25_vl_72b_finetune_config(), "qwen25_vl_72b_lora")
    cfg.model.tensor_model_parallel_size = 4
    return cfg
