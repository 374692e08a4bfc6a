"""A crafted pickle in a checkpoint is refused before anything unpickles it; nothing of it runs.

Each test plants, in one of the pickles a torch_dist checkpoint holds, an object whose
unpickling creates a marker file, and checks that loading refuses the checkpoint in one
line and that the marker does not exist (and, once, that plain pickle would have run it).
"""

import json
import os
import pickle
import shutil

import pytest
import torch
from torch.distributed.checkpoint import metadata as dcp_metadata

from megabridge import checksums
from megabridge.errors import CheckpointError
from megabridge.training import trust
from tests.helpers import megabridge

pytestmark = pytest.mark.unit


class _Payload:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, single_process_megatron):
    """A real Megatron checkpoint of a tiny Llama (converted from HF, streamed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megabridge.conversion.auto_bridge import AutoBridge

    root = tmp_path_factory.mktemp("trust")
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(str(root / "hf"))
    return AutoBridge.from_hf_pretrained(root / "hf").save_megatron_checkpoint(root / "mcore")


@pytest.fixture
def copy(checkpoint, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(checkpoint, out)
    return out


def test_a_real_checkpoint_passes(checkpoint):
    trust.check_pickles(checkpoint)
    assert isinstance(trust.read_metadata(checkpoint), dcp_metadata.Metadata)


def test_crafted_metadata_is_refused_and_never_runs(copy, tmp_path):
    marker = tmp_path / "marker"
    metadata = trust.read_metadata(copy)
    metadata.planner_data = _Payload(marker)
    (copy / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"\.metadata: its pickle names posix\.system"):
        trust.check_pickles(copy)
    assert not marker.exists()
    # what torch's own reader does with the same file: the test would see the code run
    with open(copy / ".metadata", "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_crafted_byte_item_is_refused(copy, tmp_path):
    """A ShardedObject's bytes, which torch's load planner reads with weights_only=False."""
    marker = tmp_path / "marker"
    payload = tmp_path / "payload.pt"
    torch.save({"rng": _Payload(marker)}, payload)
    shutil.copy(payload, copy / "__9_0.distcp")
    metadata = trust.read_metadata(copy)
    fqn = "rng_state/shard_0.0_1.1"
    metadata.state_dict_metadata[fqn] = dcp_metadata.BytesStorageMetadata()
    index = dcp_metadata.MetadataIndex(fqn)
    info = type(next(iter(metadata.storage_data.values())))
    metadata.storage_data[index] = info("__9_0.distcp", 0, payload.stat().st_size)
    (copy / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"__9_0\.distcp \(rng_state.*not plain data"):
        trust.check_pickles(copy)
    assert not marker.exists()


def test_byte_item_outside_the_folder_is_refused(copy, tmp_path):
    metadata = trust.read_metadata(copy)
    fqn = "rng_state/shard_0.0_1.1"
    metadata.state_dict_metadata[fqn] = dcp_metadata.BytesStorageMetadata()
    info = type(next(iter(metadata.storage_data.values())))
    metadata.storage_data[dcp_metadata.MetadataIndex(fqn)] = info("../outside.distcp", 0, 8)
    (copy / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"names \.\./outside\.distcp"):
        trust.check_pickles(copy)


def test_crafted_common_pt_is_refused(copy, tmp_path):
    marker = tmp_path / "marker"
    torch.save({"train_state": _Payload(marker)}, copy / "common.pt")
    with pytest.raises(CheckpointError, match=r"common\.pt: its pickle is not plain data"):
        trust.check_pickles(copy)
    assert not marker.exists()


def test_numpy_rng_state_is_plain_data(tmp_path):
    """What training checkpoints hold besides tensors: NumPy's RNG state passes."""
    import numpy as np

    torch.save({"numpy": np.random.get_state(), "torch": torch.get_rng_state()}, tmp_path / "a.pt")
    trust._weights_only((tmp_path / "a.pt").read_bytes(), "a.pt")


def test_convert_refuses_a_crafted_checkpoint_in_one_line(copy, tmp_path):
    marker = tmp_path / "marker"
    metadata = trust.read_metadata(copy)
    metadata.planner_data = _Payload(marker)
    (copy / ".metadata").write_bytes(pickle.dumps(metadata))
    # an attacker records the new size too, so megabridge.json's file list still agrees
    record = json.loads((copy / "megabridge.json").read_text())
    record["files"][".metadata"] = (copy / ".metadata").stat().st_size
    record["checksums"]["files"][".metadata"] = checksums.digest(copy / ".metadata")
    (copy / "megabridge.json").write_text(json.dumps(record))
    result = megabridge(["convert", "megatron-to-hf", "--megatron-path", str(copy),
                         "--hf-path", str(tmp_path / "out")])  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "posix.system" in lines[0], result.stderr[-2000:]
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_convert_refuses_a_shard_with_flipped_bytes_in_one_line(copy, tmp_path):
    """Damage that keeps the size (a bad disk, a bad copy): only the checksum sees it."""
    shard = sorted(copy.glob("*.distcp"))[0]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert shard.stat().st_size == size
    result = megabridge(["convert", "megatron-to-hf", "--megatron-path", str(copy),
                         "--hf-path", str(tmp_path / "out")])  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert f"{shard.name} is damaged: its content differs" in lines[0]
    assert not (tmp_path / "out").exists()
