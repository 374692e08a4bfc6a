"""Supervised fine-tuning examples from JSONL: rendered, tokenized, loss only on the answers.

Each line is one example, in one of two shapes:

* ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}``:
  rendered with the tokenizer's own chat template (``apply_chat_template``).
  The loss covers every assistant turn: its content and whatever the template
  closes the turn with (e.g. ``<|im_end|>``), not the assistant header that the
  generation prompt already holds. The whole conversation is tokenized at once
  (as ``apply_chat_template(tokenize=True)`` does) and a token is an answer
  token when its first character lies inside an assistant turn.
* ``{"input": ..., "output": ...}``: the text is ``input + output`` exactly (put
  any separator in ``input``), with the tokenizer's BOS first if it adds one, and
  EOS after the output. The loss covers the output and the EOS.

An example of n tokens trains n - 1 positions (inputs ids[:-1], labels ids[1:]).
One with more than ``seq_length`` positions is dropped, and the run logs how
many were dropped and where; truncating would teach answers that stop mid-way.
A file with no examples, a line that is not a JSON object or lacks the keys, and
a conversation without an assistant turn are UserErrors naming file and line.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megabridge.errors import ConfigError, UserError
from megabridge.training.data import jsonl

log = logging.getLogger(__name__)

VALID_SPLIT_SEED = 0  # the held-out examples depend on the file only, not on rng.seed


@dataclass
class Example:
    ids: np.ndarray  # [n] int64 token ids
    answer: np.ndarray  # [n] bool: the token is part of an answer (its prediction is trained)
    where: str  # "file:line"

    def __len__(self) -> int:
        """Positions this example occupies in a sequence: n - 1 (the last id is only a label)."""
        return len(self.ids) - 1


# ------------------------------------------------------------------- rendering


def _messages(record: dict, where: str) -> list[dict]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise UserError(f"{where}: messages[{i}] has no 'role' string")
        content = m.get("content")
        if isinstance(content, list) and any(_is_media(part) for part in content):
            raise UserError(
                f"{where}: messages[{i}] has image or video parts, but the model is text-only "
                "(images need a vision-language model)"
            )
        if not isinstance(content, str):
            raise UserError(f"{where}: messages[{i}] has no 'content' string")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: no assistant message, so nothing to train on")
    return messages


def _is_media(part) -> bool:
    return isinstance(part, dict) and part.get("type") in ("image", "video")


def _template(tokenizer, messages: list[dict], where: str, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # jinja2 errors raised by the template itself, e.g. role order
        raise UserError(f"{where}: the chat template failed: {e}") from None


def render_chat(tokenizer, messages: list[dict], where: str) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and which of them are assistant tokens."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{where}: 'messages' examples need a tokenizer with a chat_template "
            "(this one has none); use 'input'/'output' examples instead"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{where}: 'messages' examples need a fast (tokenizer.json) tokenizer")
    full, spans = assistant_spans(tokenizer, messages, where)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    answer = [any(s <= start < e for s, e in spans) for start, _ in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), answer


def assistant_spans(renderer, messages: list[dict], where: str) -> tuple[str, list]:
    """The rendered conversation and the (start, end) characters of each assistant turn.

    ``renderer`` is a tokenizer or a multimodal processor: anything with apply_chat_template.
    """
    full = _template(renderer, messages, where, generation_prompt=False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _template(renderer, messages[:k], where, True) if k else ""
        through = _template(renderer, messages[: k + 1], where, False)
        if not (full.startswith(before) and full.startswith(through)):
            raise UserError(
                f"{where}: the chat template does not render this conversation turn by turn "
                "(an earlier turn renders differently later), so assistant turns cannot be found"
            )
        spans.append((len(before), len(through)))
    return full, spans


def render_pair(tokenizer, prompt: str, output: str) -> tuple[list[int], list[bool]]:
    """``prompt + output`` with BOS (if the tokenizer adds one) and EOS; answer = output + EOS."""
    bos = tokenizer.bos_token_id
    head = [bos] if bos is not None and getattr(tokenizer, "add_bos_token", False) else []
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    prompt_ids = head + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    output_ids = tokenizer(output, add_special_tokens=False)["input_ids"] + eos
    return prompt_ids + output_ids, [False] * len(prompt_ids) + [True] * len(output_ids)


def render(tokenizer, record: dict, where: str) -> Example:
    """One JSONL record -> Example, or a UserError naming ``where``."""
    if "messages" in record:
        ids, answer = render_chat(tokenizer, _messages(record, where), where)
    elif "input" in record or "output" in record:
        prompt = jsonl.text_field(where, record, "input")
        output = jsonl.text_field(where, record, "output")
        ids, answer = render_pair(tokenizer, prompt, output)
    else:
        present = ", ".join(sorted(record)) or "none"
        raise UserError(
            f"{where}: expected a 'messages' list or 'input'/'output' strings "
            f"(keys present: {present})"
        )
    if not any(answer[1:]):
        raise UserError(f"{where}: the answer is empty, so nothing to train on")
    return Example(np.asarray(ids, dtype=np.int64), np.asarray(answer, dtype=bool), where)


# --------------------------------------------------------------------- loading


def _is_main() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def read_records(path: Path) -> list[tuple[str, dict]]:
    """("file:line", record) for every line of a JSONL file."""
    return [(f"{path}:{number}", record) for number, record in jsonl.records(path)]


def tokenize(records: list[tuple[str, dict]], tokenizer, seq_length: int) -> list[Example]:
    """Render every record; drop (and report) examples longer than ``seq_length``."""
    rendered = [(where, render(tokenizer, record, where)) for where, record in records]
    return keep_fitting(rendered, len(records), seq_length)


def keep_fitting(rendered: list[tuple[str, Example]], records: int, seq_length: int) -> list:
    """The examples that fit ``seq_length``; the others dropped and reported."""
    examples, overlong = [], []
    for where, example in rendered:
        if len(example) > seq_length:
            overlong.append((where, len(example.ids)))
        else:
            examples.append(example)
    if overlong and _is_main():
        shown = ", ".join(f"{w} ({n} tokens)" for w, n in overlong[:5])
        more = f" and {len(overlong) - 5} more" if len(overlong) > 5 else ""
        log.warning(
            "dropped %d of %d SFT examples with more than dataset.seq_length + 1 = %d tokens: %s%s",
            len(overlong),
            records,
            seq_length + 1,
            shown,
            more,
        )
    if records and not examples:
        first, n = overlong[0]
        raise UserError(
            f"every example has more than dataset.seq_length + 1 = {seq_length + 1} tokens "
            f"(e.g. {first}: {n} tokens); raise dataset.seq_length (and model.seq_length)"
        )
    return examples


def split_off(records: list, fraction: float) -> tuple[list, list]:
    """(train, validation): a fixed ``fraction`` of the records held out, the same every run."""
    n = len(records)
    n_valid = min(max(round(fraction * n), 1), n - 1) if fraction > 0 and n > 1 else 0
    held = set(np.random.RandomState(VALID_SPLIT_SEED).permutation(n)[:n_valid].tolist())
    train = [r for i, r in enumerate(records) if i not in held]
    valid = [r for i, r in enumerate(records) if i in held]
    return train, valid


def _find(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def source_files(path: str | None) -> tuple[Path, Path | None]:
    """(train file, validation file or None) for dataset.path."""
    if not path:
        raise ConfigError(
            "dataset.type=sft needs dataset.path=FILE.jsonl (or a folder with train.jsonl "
            "and optionally validation.jsonl)"
        )
    p = Path(path)
    if p.is_dir():
        train = _find(p, "train")
        if train is None:
            raise ConfigError(f"dataset.path={path}: the folder has no train.jsonl(.gz)")
        return train, _find(p, "validation")
    if not p.is_file():
        raise ConfigError(f"dataset.path={path}: no such file or folder")
    return p, None


def load_records(cfg) -> tuple[list, list]:
    """(train records, validation records) of cfg.dataset, each ("file:line", record)."""
    train_file, valid_file = source_files(cfg.dataset.path)
    train_records = read_records(train_file)
    if valid_file is not None:
        return train_records, read_records(valid_file)
    return split_off(train_records, cfg.dataset.valid_fraction)


def load(cfg, tokenizer, seq_length: int) -> tuple[list[Example], list[Example]]:
    """(train examples, validation examples) for cfg.dataset."""
    train_records, valid_records = load_records(cfg)
    train = tokenize(train_records, tokenizer, seq_length)
    valid = tokenize(valid_records, tokenizer, seq_length) if valid_records else []
    log_loaded(cfg, train, valid)
    return train, valid


def log_loaded(cfg, train: list, valid: list) -> None:
    train_file, valid_file = source_files(cfg.dataset.path)
    if _is_main():
        where = valid_file or f"{cfg.dataset.valid_fraction:g} of {train_file.name} held out"
        log.info(
            "SFT data: %d train examples from %s, %d validation examples (%s)",
            len(train),
            train_file,
            len(valid),
            where,
        )
