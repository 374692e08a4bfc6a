"""OLMo 3 recipes: a tiny model for tests and smoke runs. Point checkpoint.pretrained_checkpoint
at a local HF folder (or a converted checkpoint) to fine-tune: the architecture is then read from
it. No released size is listed yet: their long-context global layers use YaRN RoPE, which
megabridge does not convert yet (refused in one line)."""

from megabridge.models.olmo3.bridge import Olmo3Bridge
from megabridge.recipes import sized, tiny_finetune, tiny_pretrain

_FULL, _LOCAL = "full_attention", "sliding_attention"
# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES: dict[str, dict] = {}
TINY = dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, rms_norm_eps=1e-6, sliding_window=8,
            layer_types=[_LOCAL, _LOCAL, _LOCAL, _FULL], eos_token_id=None,
            rope_parameters={_FULL: {"rope_type": "default", "rope_theta": 5e5},
                             _LOCAL: {"rope_type": "default", "rope_theta": 5e5}})  # fmt: skip


def olmo3_tiny_pretrain_config():
    """A tiny OLMo 3-shaped model (three windowed layers, one global) on mock data (tests)."""
    return tiny_pretrain("olmo3_tiny", sized(Olmo3Bridge, TINY))


def olmo3_tiny_finetune_config():
    """SFT of a tiny OLMo 3 from checkpoint.pretrained_checkpoint (tests, smoke runs)."""
    return tiny_finetune("olmo3_tiny_sft", olmo3_tiny_pretrain_config().model)
