"""Streamed HF -> Megatron checkpoints hold exactly what saving a built model holds, every family."""

import pytest
import torch

from megabridge.conversion.tiny import families, tiny_config
from tests.hf_models import save_tiny

FAMILIES = families()


def _dcp_layout(folder):
    """{tensor key: (global size, dtype, sorted chunks)} and the byte entries of a checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    out = {}
    for key, entry in meta.items():
        if hasattr(entry, "chunks"):
            chunks = sorted((tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks)
            out[key] = (tuple(entry.size), entry.properties.dtype, chunks)
        else:
            out[key] = "bytes"
    return out


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_streamed_checkpoint_equals_saved_model(family, dtype, tmp_path):
    from megabridge.conversion import streaming
    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.models.provider import build_model
    from megabridge.training import checkpointing

    config = tiny_config(family)
    hf = save_tiny(config, tmp_path / "hf", dtype=dtype)
    bridge = AutoBridge.from_hf_pretrained(hf)
    cfg = bridge.to_megatron_provider()
    cfg.bf16 = dtype == torch.bfloat16
    plan = streaming.plan(bridge, cfg, *build_model(cfg, meta=True))
    assert isinstance(plan, streaming.Plan)  # no fallback to the model
    streamed = bridge.save_megatron_checkpoint(tmp_path / "streamed", cfg)

    model = bridge.to_megatron_model(cfg)
    saved = checkpointing.save_model(tmp_path / "saved", model, cfg)
    assert _dcp_layout(streamed) == _dcp_layout(saved)

    loaded = bridge.to_megatron_model(cfg, load_weights=False)
    checkpointing.load(streamed, loaded, model_only=True)
    expected, actual = model[0].state_dict(), loaded[0].state_dict()
    for name, tensor in expected.items():
        if isinstance(tensor, torch.Tensor):
            assert actual[name].dtype == tensor.dtype, name
            assert torch.equal(actual[name], tensor), name
    assert {p.dtype for p in loaded[0].parameters()} == {dtype}


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_streamed_conversion_names_a_misshapen_tensor_and_leaves_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.errors import ConversionError

    hf = save_tiny(tiny_config("llama"), tmp_path / "hf")
    weights = load_file(hf / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    weights[name] = weights[name][:-1]
    save_file(weights, hf / "model.safetensors", metadata={"format": "pt"})
    bridge = AutoBridge.from_hf_pretrained(hf)
    with pytest.raises(ConversionError, match=r"shape mismatch .*up_proj"):
        bridge.save_megatron_checkpoint(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_a_failed_conversion_stops_and_waits_for_its_other_writers(tmp_path, monkeypatch):
    """torch's checkpoint writer returns on its own thread's error while its other threads
    still build and write tensors: a folder removed then could be written into again. The
    conversion raises only once every writer thread has finished."""
    import threading
    import time

    from safetensors.torch import load_file, save_file

    from megabridge.conversion import transfer
    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.errors import ConversionError

    hf = save_tiny(tiny_config("llama"), tmp_path / "hf")
    weights = load_file(hf / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    weights[name] = weights[name][:, :-1].contiguous()
    save_file(weights, hf / "model.safetensors", metadata={"format": "pt"})
    real_full_tensor = transfer.full_tensor

    def slow_full_tensor(*args, **kwargs):
        time.sleep(0.2)  # the other writers are mid-tensor when the bad one fails
        return real_full_tensor(*args, **kwargs)

    monkeypatch.setattr(transfer, "full_tensor", slow_full_tensor)
    before = set(threading.enumerate())
    with pytest.raises(ConversionError, match=r"shape mismatch .*down_proj"):
        AutoBridge.from_hf_pretrained(hf).save_megatron_checkpoint(tmp_path / "out")
    writers = [t for t in threading.enumerate() if t not in before and not t.daemon]  # not tqdm's
    assert [t for t in writers if t.is_alive()] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("streamed", [False, True], ids=["model", "streamed"])
def test_vocab_size_beyond_the_embedding_rows_is_refused(tmp_path, streamed):
    """config.json's vocab_size larger than the embedding: an error, not zero rows added."""
    import json

    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.errors import ConversionError

    hf = save_tiny(tiny_config("llama"), tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["vocab_size"] += 8
    (hf / "config.json").write_text(json.dumps(config))
    bridge = AutoBridge.from_hf_pretrained(hf)
    with pytest.raises(ConversionError, match="has 256 rows, but config.json says vocab_size=264"):
        if streamed:
            bridge.save_megatron_checkpoint(tmp_path / "mcore")
        else:
            bridge.to_megatron_model()
    assert not (tmp_path / "mcore").exists()
