"""Reading JSONL (optionally gzip-compressed) with errors that name the file and line."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from megabridge.errors import UserError


def lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every non-blank line; ``.gz`` files are decompressed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise UserError(f"{path}:{number}: not UTF-8 text") from None
                if text.strip():
                    yield number, text
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: cannot read: {e}") from None


def parse(where: str, text: str) -> dict:
    """One JSONL line as a dict, or a UserError naming ``where`` ("file:line")."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every line of a JSONL file; an empty file is a UserError."""
    count = 0
    for number, text in lines(path):
        count += 1
        yield number, parse(f"{path}:{number}", text)
    if count == 0:
        raise UserError(f"{path}: empty file (expected one JSON object per line)")


def text_field(where: str, record: dict, key: str) -> str:
    """``record[key]`` as a string, or a UserError naming ``where`` and the key."""
    if key not in record:
        present = ", ".join(sorted(record)) or "none"
        raise UserError(f"{where}: missing key {key!r} (keys present: {present})")
    value = record[key]
    if not isinstance(value, str):
        raise UserError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value
