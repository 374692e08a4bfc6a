"""Small offline tokenizers and corpora for the data tests (nothing is downloaded)."""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
ADJECTIVES = ["big", "small", "red", "green", "old", "new"]
NOUNS = ["cat", "dog", "bird", "fish", "tree", "house", "car", "boat"]
VERBS = ["sees", "likes", "finds", "takes", "moves"]
OTHER = ["the", "a", ".", "?", "repeat", "twice", "what", "is", "and", "name", "colour", "of"]
WORDS = ADJECTIVES + NOUNS + VERBS + OTHER
# A chat template in the usual shape: role header, content, end marker.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tokenizer(folder: Path, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """A word-level HF tokenizer (specials + WORDS) saved to ``folder``; returns the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIALS[4:],
    )
    if chat_template:
        hf.chat_template = chat_template
    hf.save_pretrained(str(folder))
    return Path(folder)


def vocab_size() -> int:
    return len(SPECIALS) + len(WORDS)


def sentence(rng: random.Random) -> str:
    a, n1, v, n2 = rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(VERBS), rng.choice(NOUNS)
    return f"the {a} {n1} {v} the {n2} ."


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def text_corpus(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` documents of a few sentences each, as {"text": ...} lines."""
    rng = random.Random(seed)
    docs = [{"text": " ".join(sentence(rng) for _ in range(rng.randint(1, 4)))} for _ in range(n)]
    return write_jsonl(path, docs)


def chat_example(rng: random.Random) -> dict:
    a, b = rng.choice(NOUNS), rng.choice(NOUNS)
    return {
        "messages": [
            {"role": "user", "content": f"repeat {a} and {b} twice"},
            {"role": "assistant", "content": f"{a} {b} {a} {b} ."},
        ]
    }


def chat_corpus(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    return write_jsonl(path, [chat_example(rng) for _ in range(n)])
