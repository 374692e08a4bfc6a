"""Hugging Face folders: streaming safetensors reads, sharded writes, atomic output folders.

Reading opens every shard memory-mapped and hands out one tensor at a time.
Writing streams tensors into shards of at most ``max_shard_bytes`` (or the
source's own shard layout, for a faithful round trip), writes
model.safetensors.index.json, and copies tokenizer and generation files.
Every output folder is built under a temporary sibling and renamed into place
when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from megabridge.conversion import mxfp4
from megabridge.errors import ConversionError, UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files that travel with the weights (tokenizer, generation defaults, chat template).
SIDECAR_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_header(path: Path) -> dict:
    """The safetensors JSON header, after checking that the file holds every byte it lists.

    The data offset (8 + header length) is kept under the key ``__data_start__``.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise ConversionError(f"{path} is not a valid safetensors file ({e})") from None
    end = max(
        (v["data_offsets"][1] for k, v in header.items() if not k.startswith("__")), default=0
    )
    if 8 + n + end > size:
        raise ConversionError(
            f"{path} is truncated: its header lists {8 + n + end} bytes, the file has {size}"
        )
    header["__data_start__"] = 8 + n
    return header


class HFCheckpoint:
    """A local HF model folder: config.json plus one or more safetensors files."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"HF model folder {self.path} does not exist")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise UserError(f"{self.path} has no config.json: not an HF model folder")
        try:
            self.config_dict = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{config_file} is not valid JSON: {e}") from None
        self.weight_map = self._weight_map()
        self._headers = {
            f: _read_header(self.path / f) for f in sorted(set(self.weight_map.values()))
        }
        self._handles: dict[str, object] = {}
        self._derive_quantized()

    def _derive_quantized(self) -> None:
        """Quantized checkpoints: each tensor stored as several (MXFP4 blocks + scales) is
        listed, and read, dequantized under its own name; its stored parts are not listed."""
        self._derived: dict[str, mxfp4.Derived] = {}
        shapes = {n: self.shape(n) for n in self.weight_map}
        self._derived = mxfp4.derived_tensors(self.config_dict.get("quantization_config"), shapes)
        for name, derived in self._derived.items():
            self.weight_map[name] = self.weight_map[derived.sources[0]]
            for source in derived.sources:
                del self.weight_map[source]

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index} is not a valid safetensors index: {e}") from None
            root = self.path.resolve()
            outside = sorted(
                {f for f in weight_map.values() if not (root / f).resolve().is_relative_to(root)}
            )
            if outside:  # "../x", "/abs/x", or a link that points out of the folder
                raise ConversionError(
                    f"{index} names shard files outside {self.path}: {', '.join(outside)}"
                )
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise ConversionError(f"{index} names missing shard files: {', '.join(missing)}")
            return weight_map
        single = self.path / SINGLE
        if single.is_file():
            header = _read_header(single)
            return {k: SINGLE for k in header if not k.startswith("__")}
        if list(self.path.glob("*.bin")):
            raise UserError(
                f"{self.path} holds PyTorch .bin weights; megabridge reads safetensors only "
                "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))"
            )
        raise UserError(f"{self.path} has no safetensors weights")

    # ------------------------------------------------------------------ reads

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def dtype(self, name: str) -> torch.dtype:
        if name in self._derived:
            return self._derived[name].dtype
        return _DTYPES[self._headers[self.weight_map[name]][name]["dtype"]]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._derived:
            return self._derived[name].shape
        return tuple(self._headers[self.weight_map[name]][name]["shape"])

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from disk into fresh memory.

        Plain reads rather than a memory map: a map keeps every page read so far
        resident in this process, so converting a model would hold a second copy
        of it. Here only the tensor being converted is in memory.
        """
        if name not in self.weight_map:
            raise ConversionError(f"tensor {name!r} is not in {self.path}")
        if name in self._derived:
            derived = self._derived[name]
            return derived.build([self._read(source) for source in derived.sources])
        return self._read(name)

    def _read(self, name: str) -> torch.Tensor:
        file = self._file_of(name)
        header = self._headers[file]
        info = header[name]
        start, end = info["data_offsets"]
        data = bytearray(end - start)
        with open(self.path / file, "rb") as f:
            f.seek(header["__data_start__"] + start)
            if f.readinto(data) != len(data):
                raise ConversionError(f"{self.path / file} ended early while reading {name}")
        dtype = _DTYPES[info["dtype"]]
        if not data:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(info["shape"])

    def _file_of(self, name: str) -> str:
        """The shard of a stored tensor (also of one that is listed under a derived name)."""
        if name in self.weight_map:
            return self.weight_map[name]
        owner = next(d for d, v in self._derived.items() if name in v.sources)
        return self.weight_map[owner]

    def files_by_name(self) -> dict[str, str]:
        return dict(self.weight_map)


# ------------------------------------------------------------------ writes


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write into; renamed to ``path`` on success only."""
    final = Path(path)
    if final.exists() and not overwrite:
        raise UserError(f"output {final} already exists (pass --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


class ShardedWriter:
    """Streams (name, tensor) pairs into safetensors shards plus an index.

    With ``file_of`` (name -> shard file, e.g. the source's index) the source's
    layout is reproduced: a shard is written as soon as all its tensors arrived.
    Otherwise shards are filled greedily up to ``max_shard_bytes``.
    """

    def __init__(self, folder: Path, max_shard_bytes: int, file_of: dict[str, str] | None = None):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self.file_of = file_of
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._remaining: dict[str, int] = {}
        if file_of is not None:
            for f in file_of.values():
                self._remaining[f] = self._remaining.get(f, 0) + 1
        self._greedy: dict[str, torch.Tensor] = {}
        self._greedy_bytes = 0
        self._count = 0
        self.weight_map: dict[str, str] = {}
        self.tensor_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.weight_map or name in self._greedy:
            raise ConversionError(f"tensor {name!r} was produced twice")
        tensor = tensor.detach().contiguous().cpu()
        size = tensor.numel() * tensor.element_size()
        self.tensor_bytes += size
        if self.file_of is not None:
            target = self.file_of.get(name)
            if target is None:
                raise ConversionError(f"tensor {name!r} has no shard in the reference layout")
            self._pending.setdefault(target, {})[name] = tensor
            self._remaining[target] -= 1
            if self._remaining[target] == 0:
                self._write(target, self._pending.pop(target))
            return
        if self._greedy and self._greedy_bytes + size > self.max_shard_bytes:
            self._flush_greedy()
        self._greedy[name] = tensor
        self._greedy_bytes += size

    def _write(self, file: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(self.folder / file), metadata={"format": "pt"})
        for key in tensors:
            self.weight_map[key] = file

    def _flush_greedy(self) -> None:
        if self._greedy:
            self._count += 1
            self._write(f"model-{self._count:05d}.safetensors", self._greedy)
            self._greedy, self._greedy_bytes = {}, 0

    def close(self) -> None:
        if self.file_of is not None:
            unfinished = {f: n for f, n in self._remaining.items() if n}
            if unfinished:
                missing = sorted(k for k, f in self.file_of.items() if k not in self.weight_map)
                raise ConversionError(f"export is missing tensors: {', '.join(missing[:10])}")
        else:
            self._flush_greedy()
            self._rename_greedy_shards()
        files = set(self.weight_map.values())
        if files == {SINGLE}:
            return
        index = {
            "metadata": {"total_size": self.tensor_bytes},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def _rename_greedy_shards(self) -> None:
        # named like transformers names them: model.safetensors, or model-0000i-of-0000N
        files = sorted(set(self.weight_map.values()))
        n = len(files)
        if n == 1:
            renames = {files[0]: SINGLE}
        else:
            renames = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(files)}
        for old, new in renames.items():
            os.rename(self.folder / old, self.folder / new)
        self.weight_map = {k: renames[v] for k, v in self.weight_map.items()}


def write_hf_folder(
    out: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    config_dict: dict,
    source: Path | None = None,
    file_of: dict[str, str] | None = None,
    max_shard_bytes: int = 5 * 10**9,
) -> None:
    """Fill ``out`` (an empty folder) with weights, config.json and the source's sidecar files."""
    writer = ShardedWriter(out, max_shard_bytes, file_of)
    for name, tensor in tensors:
        writer.add(name, tensor)
    writer.close()
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    if source is not None:
        for name in SIDECAR_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, out / name)
