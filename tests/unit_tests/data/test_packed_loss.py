"""Packed (THD) and padded SFT samples give the same loss on the same examples and weights."""

import pytest
import torch

from megabridge.models.config import ModelConfig
from megabridge.training.data import packing, sft
from tests.data_helpers import chat_corpus, vocab_size

pytestmark = pytest.mark.unit


def _model(position_embedding_type: str):
    from megabridge.models import init as weight_init
    from megabridge.models.provider import build_model

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
        bf16=False,
        init_method_std=0.2,  # large weights: attention leaking across examples would show
    )
    (model,) = build_model(cfg)
    weight_init.initialize([model], cfg, seed=7)
    return model.eval()


@torch.no_grad()
def _loss_sum_and_tokens(model, dataset, collate) -> tuple[float, float]:
    total, tokens = torch.zeros((), dtype=torch.float64), 0.0
    for i in range(len(dataset)):
        batch = collate([dataset[i]])
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


@pytest.mark.parametrize("position_embedding_type", ["rope", "learned_absolute"])
def test_packed_and_padded_losses_match(
    single_process_megatron, tokenizer, tmp_path, position_embedding_type
):
    from megabridge.training.data.batching import collate

    examples = sft.tokenize(sft.read_records(chat_corpus(tmp_path / "c.jsonl", 12)), tokenizer, 64)
    packed = packing.PackedSFTDataset(examples, 64, seed=0)
    padded = packing.PaddedSFTDataset(examples, 64, seed=0)
    assert len(packed) < len(padded) == 12
    model = _model(position_embedding_type)
    packed_sum, packed_tokens = _loss_sum_and_tokens(model, packed, packed.collate)
    padded_sum, padded_tokens = _loss_sum_and_tokens(model, padded, collate)
    assert packed_tokens == padded_tokens > 0
    assert packed_sum / packed_tokens == pytest.approx(padded_sum / padded_tokens, abs=1e-5)
    # without the boundaries, the same packed tokens give another loss: the test can tell
    sample = packed[0]
    batch = packed.collate([sample])
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
