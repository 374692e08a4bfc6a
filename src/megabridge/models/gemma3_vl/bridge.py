"""Gemma 3 multimodal (Gemma3ForConditionalGeneration) as a vision-language model: a SigLIP
tower and Gemma 3's projector (average pooling to mm_tokens_per_image tokens, a (1 + w)
RMSNorm, a linear map; models/llava/tower.py) in front of Gemma 3's language model, whose
attention lets each image's tokens see each other both ways (bidirectional_image_attention).

``AutoBridge.from_hf_pretrained(path, text_only=True)`` (``--text-only``; training with a
text recipe) reads the same checkpoint as a text-only Gemma 3 instead (models/gemma3).
"""

from megabridge.conversion.registry import register_bridge
from megabridge.conversion.vit import (
    HF_RENAMES,
    language_model,
    read_vit,
    tower_mappings,
    write_vit,
)
from megabridge.models.gemma3.bridge import Gemma3Bridge

PROJECTOR = ("mm_input_projection_weight", "mm_soft_emb_norm.weight")
# Top-level Gemma3Config token ids (config.json's *_index) -> ModelConfig.vision's names
TOKENS = {"image_token_index": "image_token_id", "boi_token_index": "boi_token_id",
          "eoi_token_index": "eoi_token_id"}  # fmt: skip


@register_bridge
class Gemma3VLBridge(Gemma3Bridge):
    """Gemma 3's language model under language_model., with a SigLIP tower in front."""

    family = "gemma3_vl"
    architectures = ("Gemma3ForConditionalGeneration",)
    hf_model_type = "gemma3"
    VISION = True
    TEXT_TOWERS = ()  # the text-only reading is Gemma3Bridge's
    HF_RENAMES = HF_RENAMES  # the same layouts as LLaVA's files
    MAPPINGS = [
        *language_model(Gemma3Bridge.MAPPINGS),
        *tower_mappings(PROJECTOR),
    ]
    NOTES = (
        "images through a SigLIP tower (its layers split over TP ranks, the rest replicated; "
        "first PP stage); "
        "bidirectional attention within each image (torch spec); --text-only reads the "
        "language model alone; SFT and LoRA on images (padded)"
    )

    @classmethod
    def model_config(cls, hf_config):
        cfg = super().model_config(hf_config.text_config)
        cfg.share_embeddings_and_output_weights = bool(hf_config.tie_word_embeddings)
        cfg.bidirectional_image_attention = True
        tokens = {ours: getattr(hf_config, hf) for hf, ours in TOKENS.items()}
        cfg.vision = {
            "kind": "gemma3", "text_hidden_size": cfg.hidden_size,
            **read_vit(cls, hf_config.vision_config),
            "mm_tokens_per_image": hf_config.mm_tokens_per_image, **tokens,
        }  # fmt: skip
        return cfg

    @classmethod
    def hf_config_dict(cls, cfg):
        text = super().hf_config_dict(cfg)
        del text["architectures"]
        text["model_type"] = Gemma3Bridge.hf_model_type
        return {
            "architectures": [cls.architectures[0]],
            "model_type": cls.hf_model_type,
            "text_config": text,
            "vision_config": write_vit(cfg.vision),
            "mm_tokens_per_image": cfg.vision["mm_tokens_per_image"],
            "tie_word_embeddings": text["tie_word_embeddings"],
            **{hf: cfg.vision[ours] for hf, ours in TOKENS.items()},
        }
