"""Packed (THD) and padded SFT samples give the same loss on the same examples and weights.

On a machine with a GPU (scripts/gpu_smoke.sh runs this file there) every case runs on
CUDA, and a bf16 case is added: the GPU's packed path (fused THD RoPE, varlen flash
attention) against its padded one.
"""

import pytest
import torch

from megabridge.training.config import ModelConfig
from megabridge.training.data import packing, sft
from tests.data_helpers import chat_corpus, vocab_size

pytestmark = pytest.mark.unit


CASES = [("rope", False, False), ("rope", True, False), ("learned_absolute", False, False)]
if torch.cuda.is_available():
    CASES.append(("rope", True, True))


def _model(position_embedding_type: str, rope_fusion: bool = False, bf16: bool = False):
    from megabridge.models import init as weight_init
    from megabridge.models.provider import build_model
    from megabridge.models.torch_layers import install_fused_rope

    cfg = ModelConfig(
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=vocab_size(),
        seq_length=64,
        position_embedding_type=position_embedding_type,
        transformer_impl="torch",
        bf16=bf16,
        init_method_std=0.2,  # large weights: attention leaking across examples would show
    )
    (model,) = build_model(cfg)
    weight_init.initialize([model], cfg, seed=7)
    if rope_fusion:
        # What the torch spec does on a GPU (models/provider._gpu_fusions): Megatron-Core's
        # RoPE dispatcher calls megabridge's fused kernels, the packed one included.
        install_fused_rope()
        model.config.apply_rope_fusion = True
    return model.eval()


@torch.no_grad()
def _loss_sum_and_tokens(model, dataset, collate) -> tuple[float, float]:
    from megabridge.training.data.batching import to_device

    device = next(model.parameters()).device
    total, tokens = torch.zeros((), dtype=torch.float64, device=device), 0.0
    for i in range(len(dataset)):
        batch = {k: to_device(v, device) for k, v in collate([dataset[i]]).items()}
        losses = model(
            batch["tokens"],
            batch["position_ids"],
            None,
            labels=batch["labels"],
            packed_seq_params=batch.get("packed_seq_params"),
        )
        total += (losses.double() * batch["loss_mask"].double()).sum()
        tokens += float(batch["loss_mask"].sum())
    return float(total), tokens


@pytest.mark.parametrize("position_embedding_type, rope_fusion, bf16", CASES)
def test_packed_and_padded_losses_match(
    single_process_megatron, tokenizer, tmp_path, position_embedding_type, rope_fusion, bf16
):
    from megabridge.training.data.batching import collate, to_device

    examples = sft.tokenize(sft.read_records(chat_corpus(tmp_path / "c.jsonl", 12)), tokenizer, 64)
    packed = packing.PackedSFTDataset(examples, 64, seed=0)
    padded = packing.PaddedSFTDataset(examples, 64, seed=0)
    assert len(packed) < len(padded) == 12
    model = _model(position_embedding_type, rope_fusion, bf16)
    packed_sum, packed_tokens = _loss_sum_and_tokens(model, packed, packed.collate)
    padded_sum, padded_tokens = _loss_sum_and_tokens(model, padded, collate)
    assert packed_tokens == padded_tokens > 0
    tolerance = dict(rel=1e-2) if bf16 else dict(abs=1e-5)
    assert packed_sum / packed_tokens == pytest.approx(padded_sum / padded_tokens, **tolerance)
    # without the boundaries, the same packed tokens give another loss: the test can tell
    device = next(model.parameters()).device
    batch = {k: to_device(v, device) for k, v in packed.collate([packed[0]]).items()}
    with torch.no_grad():
        bounded = model(
            batch["tokens"],
            batch["position_ids"],
            None,
            labels=batch["labels"],
            packed_seq_params=batch["packed_seq_params"],
        )
        crossing = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    mask = batch["loss_mask"]
    assert not torch.allclose((bounded * mask).sum(), (crossing * mask).sum(), atol=1e-3)
