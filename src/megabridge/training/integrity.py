"""Is a checkpoint folder whole? Sizes and checksums recorded at save, checked before a load.

``megabridge.json`` (written last by a save) records every file's size and XXH3-128
checksum (megabridge.checksums). verify() checks the sizes (cheap: run on every
checkpoint that pruning considers); with ``content`` it also reads every byte and checks
that ``.metadata`` can be read, as ``checkpointing.resolve`` does before any load, and
``megabridge checkpoint verify PATH`` does without loading.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from megabridge import checksums
from megabridge.errors import CheckpointError, UserError
from megabridge.training import foreign, trust

METADATA = "megabridge.json"


def verify(ckpt_dir: Path, content: bool = False) -> str | None:
    """Why ``ckpt_dir`` cannot be trusted as a complete checkpoint, or None when it can.

    Cheap checks (every file there, at its saved size) always; with ``content``, also
    every file's checksum and whether ``.metadata`` can be read (a read of every byte).
    """
    problems = verify_all(ckpt_dir, content, first_only=True)
    return problems[0] if problems else None


def verify_all(ckpt_dir: Path, content: bool = True, first_only: bool = False) -> list[str]:
    """Every reason (one line each) why ``ckpt_dir`` cannot be trusted; [] when it can."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / METADATA).is_file() and foreign.kind(ckpt_dir) is not None:
        problem = foreign.verify(ckpt_dir)  # another tool's: no sizes or checksums recorded
        return [problem] if problem else []
    if not (ckpt_dir / METADATA).is_file():
        return [f"no {METADATA} (the save did not finish)"]
    if not (ckpt_dir / "metadata.json").is_file():
        return ["no metadata.json (dist_checkpointing's)"]
    try:
        meta = json.loads((ckpt_dir / METADATA).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return [f"{METADATA} is corrupted ({e})"]
    if not isinstance(meta, dict) or not all(
        isinstance(meta.get(key, {}), dict) for key in ("files", "checksums")
    ):
        return [f"{METADATA} is corrupted (not the layout megabridge writes)"]
    found = []
    for name, size in meta.get("files", {}).items():  # absent in older checkpoints
        path = ckpt_dir / name
        if not path.is_file():
            found.append(f"{name} is missing")
        elif path.stat().st_size != size:
            found.append(f"{name} has {path.stat().st_size} bytes, {size} were written")
    if found or not content:
        return found[:1] if first_only else found
    if "checksums" in meta:  # absent in checkpoints written before megabridge recorded them
        found = checksums.problems(ckpt_dir, meta["checksums"], first_only)
    if not found:
        try:
            trust.read_metadata(ckpt_dir)
        except CheckpointError as e:
            found.append(str(e))
    return found


def has_checksums(ckpt_dir: Path) -> bool:
    try:
        return "checksums" in json.loads((Path(ckpt_dir) / METADATA).read_text())
    except (OSError, ValueError):
        return False


def verify_once(ckpt_dir: Path) -> str | None:
    """verify(content=True), read by rank 0 only when several ranks share the question."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return verify(ckpt_dir, content=True)
    box = [verify(ckpt_dir, content=True) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def file_records(folder: Path) -> dict:
    """Every file's size and checksum, recorded so that a lost, truncated or damaged file
    is noticed before a load (the files were just written: they are read from the cache)."""
    sizes = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
    return {"files": sizes, "checksums": checksums.record(folder)}


# ------------------------------------------------------------------------- CLI


def cmd_checkpoint_verify(args) -> int:
    """``megabridge checkpoint verify PATH``: one line per problem; exit 2 on damage."""
    root = Path(args.path)
    if not root.is_dir():
        raise UserError(f"checkpoint folder {root} does not exist")
    looks_like_one = (root / METADATA).exists() or (root / ".metadata").exists()
    folders = [root] if looks_like_one else sorted(p for p in root.glob("iter_*") if p.is_dir())
    if not folders:
        raise UserError(f"{root} holds no checkpoint (no {METADATA}, no iter_* folders)")
    damaged = 0
    for folder in folders:
        found = verify_all(folder)
        for problem in found:
            print(f"{folder}: {problem}", flush=True)
        if found:
            damaged += 1
        elif has_checksums(folder):
            print(f"{folder}: OK", flush=True)
        else:
            print(f"{folder}: OK (sizes only: written before megabridge recorded checksums)")
    return 2 if damaged else 0
