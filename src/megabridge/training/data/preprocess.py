"""``megabridge data preprocess``: JSONL text -> a Megatron-Core indexed dataset (.bin/.idx).

One JSON object per line; its ``--text-key`` string is one document. Documents
are tokenized by worker processes in ordered chunks, so the output is the same
for any ``--workers``, and written with Megatron-Core's IndexedDatasetBuilder
(one sequence per document, the tokenizer's EOS appended unless
``--no-append-eod``). Blank lines and documents whose text is only whitespace
are skipped and counted. Both files are written under temporary names and
renamed into place when complete, so a crash never leaves a prefix that looks
valid.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megabridge.errors import UserError
from megabridge.progress import Progress
from megabridge.training.data import jsonl
from megabridge.training.data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

CHUNK = 256  # documents per task sent to a worker


@dataclass
class Summary:
    documents: int
    tokens: int
    skipped_empty: int
    bin_path: Path
    idx_path: Path


# ------------------------------------------------------------ worker processes

_worker: dict = {}


def _init_worker(tokenizer_dir: str, source: str, text_key: str, append_eod: bool) -> None:
    tokenizer = load_tokenizer(tokenizer_dir, what="--tokenizer")
    _worker.update(
        tokenizer=tokenizer,
        source=source,
        text_key=text_key,
        eod=tokenizer.eos_token_id if append_eod else None,
    )


def _tokenize_chunk(chunk: list[tuple[int, str]]) -> list[list[int] | None]:
    """Token ids of each line's document (None: empty text, skipped)."""
    source, key = _worker["source"], _worker["text_key"]
    texts = []
    for number, line in chunk:
        where = f"{source}:{number}"
        texts.append(jsonl.text_field(where, jsonl.parse(where, line), key))
    keep = [i for i, text in enumerate(texts) if text.strip()]
    encoded = _worker["tokenizer"]([texts[i] for i in keep], add_special_tokens=True)["input_ids"]
    out: list[list[int] | None] = [None] * len(texts)
    eod = _worker["eod"]
    for i, ids in zip(keep, encoded, strict=True):
        if eod is not None and (not ids or ids[-1] != eod):
            ids = [*ids, eod]  # a tokenizer that already ends documents with EOS keeps one
        out[i] = ids
    return out


def _chunks(source: Path) -> Iterator[list[tuple[int, str]]]:
    it = jsonl.lines(source)
    while chunk := list(itertools.islice(it, CHUNK)):
        yield chunk


def _tokenized(source: Path, tokenizer_dir: str, text_key: str, append_eod: bool, workers: int):
    """Per-chunk results in input order, from ``workers`` processes (1: this one)."""
    init_args = (tokenizer_dir, str(source), text_key, append_eod)
    if workers <= 1:
        _init_worker(*init_args)
        yield from map(_tokenize_chunk, _chunks(source))
        return
    import multiprocessing

    # Workers tokenize one document at a time each; the Rust thread pool would only compete.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        yield from pool.imap(_tokenize_chunk, _chunks(source))


# ---------------------------------------------------------------------- writing


def _check_outputs(prefix: Path, overwrite: bool) -> tuple[Path, Path, Path | None]:
    """The .bin and .idx paths, and the outermost folder made for them (None if none was)."""
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    for path in (bin_path, idx_path):
        if path.exists() and not overwrite:
            raise UserError(f"{path} already exists; pass --overwrite to replace it")
    made = next((p for p in reversed(prefix.parents) if not p.exists()), None)
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {prefix.parent}: {e.strerror or e}") from None
    return bin_path, idx_path, made


def _remove_made_folders(prefix: Path, made: Path | None) -> None:
    """After a failure: the folders _check_outputs made, if nothing else was put in them."""
    if made is None:
        return
    folder = prefix.parent
    while folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        if folder == made:
            break
        folder = folder.parent


def _forget_cached_indices(prefix: Path) -> None:
    # Megatron's GPTDataset caches its sample indices in <prefix>/cache/, keyed by
    # the prefix and config but not by the data: after the data changes they are stale.
    cache = prefix / "cache"
    if cache.is_dir():
        shutil.rmtree(cache)
        if prefix.is_dir() and not any(prefix.iterdir()):
            prefix.rmdir()


def preprocess(
    source: str | Path,
    tokenizer_dir: str | Path,
    output_prefix: str | Path,
    text_key: str = "text",
    workers: int = 1,
    append_eod: bool = True,
    overwrite: bool = False,
) -> Summary:
    """Tokenize ``source`` into ``output_prefix``.bin/.idx; returns what was written."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    source, prefix = Path(source), Path(output_prefix)
    if not source.is_file():
        raise UserError(f"--input {source}: no such file")
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    tokenizer = load_tokenizer(tokenizer_dir, what="--tokenizer")
    if append_eod and tokenizer.eos_token_id is None:
        raise UserError(f"--tokenizer {tokenizer_dir} has no EOS token; pass --no-append-eod")
    bin_path, idx_path, made = _check_outputs(prefix, overwrite)
    suffix = f".partial-{os.getpid()}"
    tmp_bin, tmp_idx = Path(f"{bin_path}{suffix}"), Path(f"{idx_path}{suffix}")
    documents = tokens = empty = 0
    done = False
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=DType.optimal_dtype(len(tokenizer)))
    results = _tokenized(source, str(tokenizer_dir), text_key, append_eod, workers)
    try:
        with Progress(source.name, unit="document") as bar:
            for chunk in results:
                for ids in chunk:
                    if ids is None:
                        empty += 1
                        continue
                    builder.add_document(np.asarray(ids), [len(ids)])
                    documents += 1
                    tokens += len(ids)
                bar.update(len(chunk))
        if documents == 0:
            raise UserError(f"--input {source}: no documents (the file is empty or blank)")
        builder.finalize(str(tmp_idx))
        if overwrite:
            _forget_cached_indices(prefix)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
        done = True
    finally:
        results.close()  # stops the worker pool early on an error
        builder.data_file.close()
        if not done:
            for path in (tmp_bin, tmp_idx):
                path.unlink(missing_ok=True)
            _remove_made_folders(prefix, made)  # a failed run leaves no empty output folder
    return Summary(documents, tokens, empty, bin_path, idx_path)


# -------------------------------------------------------------------- the CLI


def cmd_preprocess(args: argparse.Namespace) -> int:
    summary = preprocess(
        args.input,
        args.tokenizer,
        args.output_prefix,
        text_key=args.text_key,
        workers=args.workers,
        append_eod=args.append_eod,
        overwrite=args.overwrite,
    )
    skipped = f" ({summary.skipped_empty} empty skipped)" if summary.skipped_empty else ""
    print(
        f"wrote {summary.bin_path} and {summary.idx_path}: {summary.documents} documents"
        f"{skipped}, {summary.tokens} tokens"
    )
    return 0
