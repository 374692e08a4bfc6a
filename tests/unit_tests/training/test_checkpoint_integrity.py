"""What makes a checkpoint trusted, skipped or refused, and saves that fail cleanly.

The folders here are hand-made (a few bytes per "shard") but sealed by the same
code a real save uses (``checkpointing._publish``); real saves are exercised in
tests/functional_tests/test_resilience.py.
"""

import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import Metadata

from megabridge import checksums, cli
from megabridge.errors import CheckpointError
from megabridge.training import checkpointing
from megabridge.training.checkpointing import resolve, verify

pytestmark = pytest.mark.unit

SHARDS = {"__0_0.distcp": 300, "__0_1.distcp": 200, "common.pt": 20}
# a readable torch .metadata (resolve() reads it, through the allow-list, before trusting a folder)
DCP_METADATA = pickle.dumps(Metadata(state_dict_metadata={}))


def publish(root: Path, iteration: int, keep_last_n: int | None = None) -> Path:
    """A small checkpoint, sealed and renamed into place as a real save does it."""
    tmp = root / f".tmp-iter_{iteration:07d}"
    tmp.mkdir(parents=True)
    for name, size in SHARDS.items():
        (tmp / name).write_bytes(b"x" * size)
    (tmp / ".metadata").write_bytes(DCP_METADATA)
    (tmp / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    final = root / checkpointing.iter_dirname(iteration)
    checkpointing._publish(tmp, final, {"iteration": iteration}, keep_last_n)
    return final


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_a_sealed_checkpoint_records_every_file_and_verifies(tmp_path):
    ckpt = publish(tmp_path, 5)
    files = checkpointing.read_metadata(ckpt)["files"]
    assert files == {**SHARDS, ".metadata": len(DCP_METADATA), "metadata.json": 33}
    assert set(checkpointing.read_metadata(ckpt)["checksums"]["files"]) == set(files)
    assert verify(ckpt) is None
    assert names(tmp_path) == ["iter_0000005", "latest_checkpointed_iteration.txt"]


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda c: os.truncate(c / "__0_0.distcp", 100), "__0_0.distcp has 100 bytes, 300 were"),
        (lambda c: (c / ".metadata").unlink(), ".metadata is missing"),
        (lambda c: (c / "metadata.json").unlink(), "no metadata.json"),
        (lambda c: (c / "megabridge.json").unlink(), "no megabridge.json"),
        (lambda c: (c / "megabridge.json").write_text("{"), "megabridge.json is corrupted"),
    ],
)
def test_damage_is_detected_skipped_in_a_folder_and_refused_by_name(
    tmp_path, caplog, damage, problem
):
    publish(tmp_path, 4)
    newest = publish(tmp_path, 8)
    damage(newest)
    assert problem in verify(newest)
    with caplog.at_level(logging.WARNING):
        assert resolve(tmp_path) == tmp_path / "iter_0000004"
    assert f"skipping checkpoint {newest}: {problem}" in caplog.text
    with pytest.raises(CheckpointError, match=f"checkpoint {newest} is incomplete or damaged"):
        resolve(newest)


def test_an_interrupted_save_is_ignored_with_a_warning_and_cleaned_by_the_next(tmp_path, caplog):
    publish(tmp_path, 4)
    (tmp_path / ".tmp-iter_0000008").mkdir()  # killed mid-save
    (tmp_path / ".tmp-iter_0000008" / "__0_0.distcp").write_bytes(b"half")
    with caplog.at_level(logging.WARNING):
        assert resolve(tmp_path) == tmp_path / "iter_0000004"
    assert "ignoring" in caplog.text and "a save that did not finish" in caplog.text
    publish(tmp_path, 12)
    assert names(tmp_path) == ["iter_0000004", "iter_0000012", "latest_checkpointed_iteration.txt"]


def test_no_complete_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    (publish(tmp_path, 4) / "megabridge.json").unlink()
    assert checkpointing.has_checkpoints(tmp_path)
    with pytest.raises(CheckpointError, match="no complete checkpoint in"):
        resolve(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve(tmp_path / "nowhere")


def test_the_latest_file_bounds_the_search_and_a_garbled_one_is_ignored(tmp_path, caplog):
    publish(tmp_path, 4)
    publish(tmp_path, 8)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4")  # went back to 4
    assert resolve(tmp_path).name == "iter_0000004"
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("\x00\x00")
    with caplog.at_level(logging.WARNING):
        assert resolve(tmp_path).name == "iter_0000008"
    assert "holds no iteration number" in caplog.text


def test_keep_last_n_prunes_only_complete_older_checkpoints_after_the_new_one(tmp_path):
    for it in (1, 2, 3):
        publish(tmp_path, it)
    (tmp_path / "iter_0000003" / "megabridge.json").unlink()  # damaged: not a fallback
    publish(tmp_path, 4, keep_last_n=2)
    assert names(tmp_path) == [
        "iter_0000002",  # the newest complete one before 4: kept as the fallback
        "iter_0000003",  # damaged, left for a human to look at
        "iter_0000004",
        "latest_checkpointed_iteration.txt",
    ]


def test_a_failed_seal_prunes_nothing_and_leaves_no_folder(tmp_path, monkeypatch):
    publish(tmp_path, 1)
    publish(tmp_path, 2)

    def disk_full(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(checkpointing, "write_json_atomic", disk_full)
    with pytest.raises(OSError):
        publish(tmp_path, 3, keep_last_n=1)
    assert names(tmp_path) == ["iter_0000001", "iter_0000002", "latest_checkpointed_iteration.txt"]
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "2"


# ------------------------------------------- save() on one rank (gloo, world size 1)


@pytest.mark.usefixtures("single_process_megatron")
def test_weights_with_nan_are_never_written(tmp_path):
    model = torch.nn.Linear(4, 4)
    with torch.no_grad():
        model.weight[1, 2] = float("nan")
    with pytest.raises(CheckpointError, match="refusing to write .*iter_0000003.*NaN or Inf"):
        checkpointing.save(tmp_path, 3, [model], None, None, {}, None)
    assert not tmp_path.exists() or names(tmp_path) == []


@pytest.mark.usefixtures("single_process_megatron")
def test_an_unwritable_folder_is_one_clear_error_and_the_previous_checkpoint_stays(
    tmp_path, monkeypatch
):
    publish(tmp_path, 4)

    def read_only(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "mkdir", read_only)  # as root, chmod would not stop a write
    with pytest.raises(CheckpointError) as err:
        checkpointing.save(tmp_path, 8, [torch.nn.Linear(2, 2)], None, None, {}, None)
    message = str(err.value)
    assert message.startswith(f"cannot write checkpoint {tmp_path / 'iter_0000008'}: [Errno 13]")
    assert "\n" not in message
    assert names(tmp_path) == ["iter_0000004", "latest_checkpointed_iteration.txt"]
    with pytest.raises(CheckpointError, match="is not writable: \\[Errno 13\\] Permission denied"):
        checkpointing.ensure_writable(tmp_path / "new")


# ------------------------------------------------- content checksums (issue 12, item 3)


def flip_bytes(path: Path, offset: int = 10) -> None:
    """Damage that keeps the file's size: only a checksum notices it."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    data[offset + 1] ^= 0x0F
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_caught_by_the_checksum_and_resume_falls_back(tmp_path, caplog):
    publish(tmp_path, 4)
    newest = publish(tmp_path, 8)
    flip_bytes(newest / "__0_1.distcp")
    assert verify(newest) is None, "sizes alone cannot see it (pruning's cheap check)"
    problem = verify(newest, content=True)
    assert problem.startswith("__0_1.distcp is damaged: its content differs")
    with caplog.at_level(logging.WARNING):
        assert resolve(tmp_path) == tmp_path / "iter_0000004"
    assert f"skipping checkpoint {newest}: __0_1.distcp is damaged" in caplog.text
    with pytest.raises(CheckpointError, match=r"iter_0000008 is incomplete or damaged: __0_1"):
        resolve(newest)


def test_an_unreadable_dcp_metadata_is_damage_and_resume_falls_back(tmp_path, caplog):
    publish(tmp_path, 4)
    newest = publish(tmp_path, 8)
    # a .metadata that was wrong when saved (its checksum agrees): torch could not read it
    (newest / ".metadata").write_bytes(b"\x80\x04garbage")
    record = checkpointing.read_metadata(newest)
    record["files"][".metadata"] = 9
    record["checksums"]["files"][".metadata"] = checksums.digest(newest / ".metadata")
    (newest / "megabridge.json").write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING):
        assert resolve(tmp_path) == tmp_path / "iter_0000004"
    assert "cannot read" in caplog.text and ".metadata" in caplog.text


def test_a_checkpoint_without_checksums_still_loads_with_a_warning(tmp_path, caplog):
    ckpt = publish(tmp_path, 4)
    record = checkpointing.read_metadata(ckpt)
    del record["checksums"]  # as written before megabridge recorded them
    (ckpt / "megabridge.json").write_text(json.dumps(record))
    flip_bytes(ckpt / "__0_0.distcp")  # then nothing can notice this
    with caplog.at_level(logging.WARNING):
        assert resolve(tmp_path) == ckpt
    assert "has no checksums (written before megabridge recorded them)" in caplog.text


def test_checkpoint_verify_command(tmp_path, capsys):
    good = publish(tmp_path / "runs", 4)
    bad = publish(tmp_path / "runs", 8)
    assert cli.main(["checkpoint", "verify", str(good)]) == 0
    assert capsys.readouterr().out.strip() == f"{good}: OK"
    flip_bytes(bad / "__0_0.distcp")
    os.truncate(bad / "common.pt", 3)
    assert cli.main(["checkpoint", "verify", str(tmp_path / "runs")]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"{good}: OK", f"{bad}: common.pt has 3 bytes, 20 were written"]
    os.truncate(bad / "common.pt", 20)  # the size is right again; the content is not
    assert cli.main(["checkpoint", "verify", str(bad)]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ", 1)[1].split(":")[0] for line in lines] == [
        "__0_0.distcp is damaged",
        "common.pt is damaged",
    ]
    assert cli.main(["checkpoint", "verify", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
