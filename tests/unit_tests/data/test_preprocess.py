"""`megabridge data preprocess`: what it writes, and how it refuses bad input."""

import gzip
import json

import numpy as np
import pytest

from megabridge.cli import main
from megabridge.errors import UserError
from megabridge.training.data.preprocess import preprocess
from tests.data_helpers import text_corpus, write_jsonl

pytestmark = pytest.mark.unit


def _documents(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))], dataset.index.dtype


def test_documents_are_tokenized_in_order_with_eod(tokenizer_dir, tokenizer, tmp_path):
    source = write_jsonl(
        tmp_path / "c.jsonl", [{"text": "the red cat ."}, {"text": "  "}, {"text": "a dog"}]
    )
    summary = preprocess(source, tokenizer_dir, tmp_path / "out" / "c")
    assert (summary.documents, summary.skipped_empty) == (2, 1)
    docs, dtype = _documents(tmp_path / "out" / "c")
    eos = tokenizer.eos_token_id
    assert docs == [
        tokenizer("the red cat .")["input_ids"] + [eos],
        tokenizer("a dog")["input_ids"] + [eos],
    ]
    assert dtype == np.uint16 and summary.tokens == sum(map(len, docs))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c.bin", "c.idx"]


def test_workers_and_gzip_give_the_same_bytes(tokenizer_dir, tmp_path):
    source = text_corpus(tmp_path / "c.jsonl", 600)  # several chunks of 256
    packed = tmp_path / "c.jsonl.gz"
    packed.write_bytes(gzip.compress(source.read_bytes()))
    preprocess(source, tokenizer_dir, tmp_path / "one")
    preprocess(packed, tokenizer_dir, tmp_path / "two", workers=2, append_eod=False)
    preprocess(packed, tokenizer_dir, tmp_path / "three", workers=2)
    for suffix in (".bin", ".idx"):
        one = (tmp_path / f"one{suffix}").read_bytes()
        assert (tmp_path / f"three{suffix}").read_bytes() == one
    with_eod, _ = _documents(tmp_path / "one")
    without, _ = _documents(tmp_path / "two")
    assert len(with_eod) == 600 and [d[:-1] for d in with_eod] == without


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "--input {src}: no such file"),
        ("", "--input {src}: no documents"),
        ("\n\n", "--input {src}: no documents"),
        ('{"text": "a"}\n{"txt": "b"}\n', "{src}:2: missing key 'text' (keys present: txt)"),
        ('{"text": "a"}\n\n{"text": "b"\n', "{src}:3: not valid JSON"),
        ('{"text": "a"}\n["text"]\n', "{src}:2: expected a JSON object, got list"),
        ('{"text": 5}\n', "{src}:1: 'text' must be a string, got int"),
    ],
)
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_input_is_one_line_and_leaves_nothing(
    tokenizer_dir, tmp_path, content, message, workers
):
    src = tmp_path / "c.jsonl"
    if content is not None:
        src.write_text(content)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError) as e:
        preprocess(src, tokenizer_dir, out / "c", workers=workers)
    assert str(e.value).startswith(message.format(src=src)), str(e.value)
    assert list(out.iterdir()) == [], "no partial or temporary files are left"


def test_existing_output_needs_overwrite(tokenizer_dir, tmp_path):
    src = text_corpus(tmp_path / "c.jsonl", 10)
    preprocess(src, tokenizer_dir, tmp_path / "c")
    with pytest.raises(UserError, match=r"c.bin already exists; pass --overwrite"):
        preprocess(src, tokenizer_dir, tmp_path / "c")
    (tmp_path / "c" / "cache" / "GPTDataset_indices").mkdir(parents=True)  # stale indices
    summary = preprocess(
        text_corpus(tmp_path / "d.jsonl", 5), tokenizer_dir, tmp_path / "c", overwrite=True
    )
    assert summary.documents == 5 and not (tmp_path / "c").exists()
    assert len(_documents(tmp_path / "c")[0]) == 5


def test_cli_reports_bad_input_in_one_line_with_exit_2(tokenizer_dir, tmp_path, capsys):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": "a"}, {"body": "b"}])

    def run(tokenizer=tokenizer_dir):
        args = ["--input", src, "--tokenizer", tokenizer, "--output-prefix", tmp_path / "c"]
        return main(["data", "preprocess", *map(str, args)])

    assert run() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"megabridge: error: {src}:2: missing key 'text' (keys present: body)"]
    assert run(tokenizer=tmp_path / "nope") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--tokenizer={tmp_path / 'nope'}: no such folder" in err[0]
    src.write_text(json.dumps({"text": "the cat"}) + "\n")
    assert run() == 0
    assert "1 documents, 3 tokens" in capsys.readouterr().out


def test_a_failed_run_leaves_no_output_folder_it_made(tokenizer_dir, tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": "a"}, {"body": "b"}])
    with pytest.raises(UserError, match="missing key 'text'"):
        preprocess(src, tokenizer_dir, tmp_path / "new" / "deeper" / "c")
    assert not (tmp_path / "new").exists(), "the folders made for the output are removed"
    (tmp_path / "kept").mkdir()  # a folder that was there before is left alone
    with pytest.raises(UserError, match="missing key 'text'"):
        preprocess(src, tokenizer_dir, tmp_path / "kept" / "sub" / "c")
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "sub").exists()
