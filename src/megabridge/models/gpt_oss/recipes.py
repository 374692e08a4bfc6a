"""GPT-OSS recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (the official
MXFP4 one works: its experts are dequantized on import) or a converted checkpoint."""

from megabridge.models.gpt_oss.bridge import GptOssBridge
from megabridge.recipes import as_lora, finetune, sized, tiny_pretrain

_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
         "truncate": False, "original_max_position_embeddings": 4096}  # fmt: skip
_GPT_OSS = dict(hidden_size=2880, intermediate_size=2880, num_attention_heads=64,
                num_key_value_heads=8, head_dim=64, vocab_size=201088, num_experts_per_tok=4,
                sliding_window=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
                rope_theta=150000.0, rope_scaling=_YARN, swiglu_limit=7.0,
                router_aux_loss_coef=0.9, attention_bias=True, tie_word_embeddings=False)  # fmt: skip
# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
# layer_types: transformers' default, sliding and full layers alternating from layer 0.
SIZES = {
    "gpt_oss_20b": dict(_GPT_OSS, num_hidden_layers=24, num_local_experts=32),
    "gpt_oss_120b": dict(_GPT_OSS, num_hidden_layers=36, num_local_experts=128),
}
TINY = dict(_GPT_OSS, num_hidden_layers=2, hidden_size=64, intermediate_size=32,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
            num_local_experts=4, num_experts_per_tok=2, sliding_window=8)  # fmt: skip


def gpt_oss_tiny_pretrain_config():
    """A tiny GPT-OSS-shaped model (sinks, sliding/full layers, 4 biased experts, top-2)."""
    return tiny_pretrain("gpt_oss_tiny", sized(GptOssBridge, TINY))


def _finetune(size: str, pp: int, ep: int):
    cfg = finetune(f"{size}_sft", sized(GptOssBridge, SIZES[size]))
    cfg.model.pipeline_model_parallel_size, cfg.model.expert_model_parallel_size = pp, ep
    cfg.model.moe_router_dtype = "fp32"
    cfg.optimizer.use_distributed_optimizer = True
    return cfg


def gpt_oss_20b_finetune_config():
    """SFT of gpt-oss-20b on 8 H100/H200 (EP=8, 4 experts a GPU): set pretrained_checkpoint."""
    return _finetune("gpt_oss_20b", pp=1, ep=8)


def gpt_oss_20b_lora_config():
    """LoRA of gpt-oss-20b on 8 H100/H200 (EP=8): set checkpoint.pretrained_checkpoint."""
    return as_lora(gpt_oss_20b_finetune_config(), "gpt_oss_20b_lora")


def gpt_oss_120b_finetune_config():
    """SFT of gpt-oss-120b on 32 H100/H200 (PP=4 of 9 layers, EP=8): set pretrained_checkpoint."""
    return _finetune("gpt_oss_120b", pp=4, ep=8)


def gpt_oss_120b_lora_config():
    """LoRA of gpt-oss-120b on 8 H100/H200 (PP=4, EP=2: ~30 GB of frozen bf16 weights a GPU)."""
    return as_lora(_finetune("gpt_oss_120b", pp=4, ep=2), "gpt_oss_120b_lora")
