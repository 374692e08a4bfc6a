"""SFT examples: what is rendered, which tokens carry loss, how bad data is reported."""

import logging
import random

import pytest
import torch

from megabridge.errors import ConfigError, UserError
from megabridge.training.config import ConfigContainer
from megabridge.training.data import build, packing, sft
from tests.data_helpers import chat_corpus, chat_example, vocab_size, write_jsonl

pytestmark = pytest.mark.unit


def _tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def test_chat_loss_mask_covers_assistant_turns_only(tokenizer):
    record = {
        "messages": [
            {"role": "system", "content": "name the colour"},
            {"role": "user", "content": "the red cat"},
            {"role": "assistant", "content": "red ."},
            {"role": "user", "content": "the green dog"},
            {"role": "assistant", "content": "green"},
        ]
    }
    example = sft.render(tokenizer, record, "x.jsonl:1")
    tokens = _tokens(tokenizer, example.ids)
    assert tokens[0] == "<s>"
    answers = [t for t, a in zip(tokens, example.answer, strict=True) if a]
    # content and the end-of-turn marker of each assistant turn; never its header
    assert answers == ["red", ".", "<|end|>", "green", "<|end|>"]
    assert "<|assistant|>" not in answers and "the" not in answers
    # the sample trains exactly the predictions of those tokens
    dataset = packing.PaddedSFTDataset([example], seq_length=32, seed=0)
    sample = dataset[0]
    trained = sample["labels"][sample["loss_mask"] > 0]
    assert _tokens(tokenizer, trained) == answers
    assert sample["loss_mask"][len(example) :].sum() == 0  # padding has no loss


def test_input_output_loss_mask_covers_output_and_eos(tokenizer):
    example = sft.render(tokenizer, {"input": "what is the cat ?", "output": "red"}, "x:1")
    tokens = _tokens(tokenizer, example.ids)
    assert tokens == ["what", "is", "the", "cat", "?", "red", "</s>"]
    assert example.answer.tolist() == [False] * 5 + [True] * 2
    assert len(example) == 6  # n - 1 positions


@pytest.mark.parametrize(
    "line, message",
    [
        ({"text": "the cat"}, "x.jsonl:2: expected a 'messages' list or 'input'/'output'"),
        ({"input": "the cat"}, "x.jsonl:2: missing key 'output' (keys present: input)"),
        ({"input": "a", "output": 3}, "x.jsonl:2: 'output' must be a string, got int"),
        ({"messages": []}, "x.jsonl:2: 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, "x.jsonl:2: messages[0] has no 'content' string"),
        ({"messages": [{"role": "user", "content": "a"}]}, "x.jsonl:2: no assistant message"),
        ({"input": "the", "output": ""}, None),  # EOS alone is an answer
    ],
)
def test_bad_records_name_file_and_line(tokenizer, tmp_path, line, message):
    path = write_jsonl(tmp_path / "x.jsonl", [chat_example(random.Random(0)), line])
    records = [(w.replace(str(tmp_path) + "/", ""), r) for w, r in sft.read_records(path)]
    if message is None:
        assert len(sft.tokenize(records, tokenizer, 64)) == 2
        return
    with pytest.raises(UserError) as e:
        sft.tokenize(records, tokenizer, 64)
    assert str(e.value).startswith(message), str(e.value)


def test_bad_json_and_empty_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n\n{"input": "a", \n')
    with pytest.raises(UserError, match=r"bad.jsonl:3: not valid JSON"):
        sft.read_records(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(UserError, match=r"empty.jsonl: empty file"):
        sft.read_records(empty)


def test_overlong_examples_are_dropped_with_a_warning(tokenizer, tmp_path, caplog):
    long = {"input": "the cat " * 20, "output": "red"}
    path = write_jsonl(tmp_path / "x.jsonl", [chat_example(random.Random(0)), long])
    with caplog.at_level(logging.WARNING):
        examples = sft.tokenize(sft.read_records(path), tokenizer, seq_length=24)
    assert len(examples) == 1
    (record,) = [r for r in caplog.records if "dropped" in r.getMessage()]
    message = record.getMessage()
    assert "dropped 1 of 2 SFT examples with more than dataset.seq_length + 1 = 25" in message
    assert message.endswith("x.jsonl:2 (42 tokens)")
    with pytest.raises(UserError, match=r"every example has more than dataset.seq_length \+ 1"):
        sft.tokenize(sft.read_records(path), tokenizer, seq_length=8)


def test_validation_split_is_fixed_and_disjoint():
    records = list(range(100))
    train, valid = sft.split_off(records, 0.1)
    assert len(valid) == 10 and sorted(train + valid) == records
    assert sft.split_off(records, 0.1) == (train, valid)
    small_train, small_valid = sft.split_off([1, 2], 0.01)  # at least one held out, one kept
    assert len(small_train) == len(small_valid) == 1
    assert sft.split_off(records, 0.0) == (records, [])


def test_pack_respects_capacity_and_uses_every_example_once():
    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(500)]
    packs = packing.pack(lengths, 64, seed=3)
    assert sorted(i for p in packs for i in p) == list(range(500))
    assert all(sum(lengths[i] for i in p) <= 64 for p in packs)
    assert sum(lengths) / (64 * len(packs)) > 0.95  # best-fit decreasing packs tightly
    assert packing.pack(lengths, 64, seed=3) == packs  # deterministic


def test_packed_sample_restarts_positions_and_marks_boundaries(tokenizer, tmp_path):
    path = chat_corpus(tmp_path / "chat.jsonl", 6)
    examples = sft.tokenize(sft.read_records(path), tokenizer, 64)
    dataset = packing.PackedSFTDataset(examples, seq_length=64, seed=0)
    assert len(dataset) < len(examples)
    sample = dataset[0]
    bounds = sample["cu_seqlens"].tolist()
    assert bounds[0] == 0 and bounds[-1] == 64
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        assert sample["position_ids"][start:end].tolist() == list(range(end - start))
    batch = packing.PackedSFTDataset.collate([sample])
    params = batch["packed_seq_params"]
    assert params.qkv_format == "thd" and params.cu_seqlens_q.dtype == torch.int32
    assert params.max_seqlen_q == max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    assert batch["tokens"].shape == (1, 64)
    # packed and padded samples hold the same trained (input, label) pairs
    padded = packing.PaddedSFTDataset(examples, seq_length=64, seed=0)

    def pairs(ds):
        out = []
        for i in range(len(ds)):
            s = ds[i]
            keep = s["loss_mask"] > 0
            out += list(zip(s["tokens"][keep].tolist(), s["labels"][keep].tolist(), strict=True))
        return sorted(out)

    assert pairs(dataset) == pairs(padded)


def test_samples_do_not_depend_on_the_data_parallel_layout(tokenizer, tmp_path):
    from megabridge.training.data.batching import global_batch_indices

    examples = sft.tokenize(sft.read_records(chat_corpus(tmp_path / "c.jsonl", 40)), tokenizer, 64)
    packs = packing.PackedSFTDataset(examples, 64, seed=5).packs
    assert packing.PackedSFTDataset(examples, 64, seed=5).packs == packs
    n = len(packs)
    for consumed in (0, 8, 16):
        one = global_batch_indices(consumed, 8, 0, 1, n)
        two = [i for r in range(2) for i in global_batch_indices(consumed, 8, r, 2, n)]
        four = [i for r in range(4) for i in global_batch_indices(consumed, 8, r, 4, n)]
        assert one == two == four


def _sft_config(path, tokenizer_dir, **dataset):
    cfg = ConfigContainer()
    cfg.dataset.type, cfg.dataset.path = "sft", str(path)
    cfg.tokenizer.path = str(tokenizer_dir)
    cfg.model.vocab_size, cfg.model.seq_length = vocab_size(), 64
    cfg.model.transformer_impl = "torch"
    for key, value in dataset.items():
        setattr(cfg.dataset, key, value)
    return cfg


def test_build_uses_validation_file_beside_train(tokenizer_dir, tmp_path):
    chat_corpus(tmp_path / "train.jsonl", 20)
    chat_corpus(tmp_path / "validation.jsonl", 5, seed=1)
    train, valid = build(_sft_config(tmp_path, tokenizer_dir))
    assert isinstance(train, packing.PackedSFTDataset)
    assert len(train.examples) == 20 and len(valid.examples) == 5
    train, valid = build(_sft_config(tmp_path / "train.jsonl", tokenizer_dir, packed=False))
    assert len(train) == 19 and len(valid) == 1  # valid_fraction 0.05 held out


@pytest.mark.parametrize(
    "change, message",
    [
        ({"train.micro_batch_size": 2}, "dataset.packed=true needs train.micro_batch_size=1"),
        ({"model.transformer_impl": "local"}, "needs model.transformer_impl=torch"),
        ({"tokenizer.path": None}, "dataset.type=sft needs a tokenizer"),
        ({"model.vocab_size": 8}, "has 39 tokens but model.vocab_size=8"),
        ({"dataset.path": None}, "dataset.type=sft needs dataset.path"),
        ({"dataset.path": "nowhere/"}, "dataset.path=nowhere/: no such file or folder"),
    ],
)
def test_bad_sft_config_is_one_clear_error(tokenizer_dir, tmp_path, change, message):
    cfg = _sft_config(chat_corpus(tmp_path / "chat.jsonl", 4), tokenizer_dir)
    for key, value in change.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError, match=message):
        build(cfg)


def test_folder_without_train_file(tokenizer_dir, tmp_path):
    chat_corpus(tmp_path / "validation.jsonl", 4)
    with pytest.raises(ConfigError, match="the folder has no train.jsonl"):
        build(_sft_config(tmp_path, tokenizer_dir))


def test_messages_need_a_chat_template(tmp_path):
    from megabridge.training.data.tokenizer import load_tokenizer
    from tests.data_helpers import make_tokenizer

    plain = load_tokenizer(make_tokenizer(tmp_path / "tok", chat_template=None))
    with pytest.raises(UserError, match="x:1: 'messages' examples need a tokenizer with a chat"):
        sft.render(plain, chat_example(random.Random(0)), "x:1")
