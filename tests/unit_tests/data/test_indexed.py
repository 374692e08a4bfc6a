"""dataset.type=indexed: Megatron-Core GPTDataset / BlendedDataset behind our batch dict."""

import pytest
import torch

from megabridge.errors import ConfigError
from megabridge.training.config import ConfigContainer
from megabridge.training.data import build
from megabridge.training.data.preprocess import preprocess
from tests.data_helpers import text_corpus, vocab_size

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def prefixes(tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("indexed")
    a = preprocess(text_corpus(root / "a.jsonl", 200, seed=1), tokenizer_dir, root / "a")
    b = preprocess(text_corpus(root / "b.jsonl", 100, seed=2), tokenizer_dir, root / "b")
    return str(a.bin_path)[:-4], str(b.bin_path)[:-4]


def _config(blend, **dataset):
    cfg = ConfigContainer()
    cfg.dataset.type, cfg.dataset.blend = "indexed", list(blend)
    cfg.model.vocab_size, cfg.model.seq_length = vocab_size(), 32
    cfg.train.train_iters, cfg.train.global_batch_size, cfg.train.eval_iters = 3, 4, 2
    for key, value in dataset.items():
        setattr(cfg.dataset, key, value)
    return cfg


def test_samples_are_next_token_pairs_from_the_corpus(prefixes):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    train, valid = build(_config(prefixes[:1]))
    assert len(train) >= 12 and len(valid) >= 8
    sample = train[0]
    assert sorted(sample) == ["labels", "loss_mask", "position_ids", "tokens"]
    assert sample["tokens"].shape == (32,) and sample["loss_mask"].sum() == 32
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    assert torch.equal(sample["position_ids"], torch.arange(32))
    # a sample is 33 consecutive tokens of the documents, in Megatron's shuffled document order
    corpus = IndexedDataset(prefixes[0])
    order = train.dataset.document_index
    flat = torch.cat([torch.from_numpy(corpus[int(d)].astype("int64")) for d in order])
    window = torch.cat([sample["tokens"], sample["labels"][-1:]])
    assert flat.unfold(0, 33, 1).eq(window).all(dim=1).any()
    again, _ = build(_config(prefixes[:1]))  # cached indices: the same samples
    assert torch.equal(again[5]["tokens"], train[5]["tokens"])


def test_blend_of_two_prefixes_follows_the_weights(prefixes):
    cfg = _config(["1", prefixes[0], "3", prefixes[1]])
    cfg.train.train_iters = 100
    train, valid = build(cfg)
    assert len(train) == 400 and valid is not None
    ids = train.dataset.dataset_index[: len(train)]
    assert abs((ids == 1).mean() - 0.75) < 0.02


@pytest.mark.parametrize(
    "blend, split, message",
    [
        ([], "969,30,1", "dataset.type=indexed needs dataset.blend"),
        (["nowhere/x"], "969,30,1", "dataset.blend: nowhere/x.bin and .idx not found"),
        (["0", "A", "1", "B"], "969,30,1", "weights must be positive"),
        (["A"], "0,1,0", "the train weight must be > 0"),
        (["A"], "999,1,0", "the validation split of .*a \\(200 documents\\) is empty"),
    ],
)
def test_bad_blend_or_split_is_one_clear_error(prefixes, blend, split, message):
    blend = [{"A": prefixes[0], "B": prefixes[1]}.get(b, b) for b in blend]
    with pytest.raises(ConfigError, match=message):
        build(_config(blend, split=split))


def test_no_validation_split_means_no_eval_data(prefixes):
    train, valid = build(_config(prefixes[:1], split="1,0,0"))
    assert valid is None and len(train) >= 12


def test_an_explicit_tokenizer_must_fit_the_model(prefixes, tokenizer_dir):
    cfg = _config(prefixes[:1])
    cfg.tokenizer.path, cfg.model.vocab_size = str(tokenizer_dir), 16
    with pytest.raises(ConfigError, match="has 39 tokens but model.vocab_size=16"):
        build(cfg)
