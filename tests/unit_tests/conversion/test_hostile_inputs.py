"""Inputs that lie or are out of range end in one line naming the problem (issue 12)."""

import argparse
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from megabridge.conversion import commands, hf_io
from megabridge.errors import ConfigError, ConversionError, UserError
from megabridge.models.config import ModelConfig, validate_model_config
from tests.hf_models import save_tiny

pytestmark = pytest.mark.unit


def _folder(path, tensors):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    save_file(tensors, str(path / "model.safetensors"))
    return path


def _with_header(path, header: bytes, data: bytes = b"\0" * 16):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _entry(**overrides):
    return {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16], **overrides}


@pytest.mark.parametrize(
    "header, problem",
    [
        (b"[1, 2]", "its header is not an object"),
        (b'"text"', "its header is not an object"),
        (b"{bad json", "is not a valid safetensors file"),
        (json.dumps({"a": _entry(data_offsets=[0, 64], shape=[4, 4])}), "is truncated"),
        (json.dumps({"a": _entry(data_offsets=[16, 0])}), "hold -16 bytes"),
        (json.dumps({"a": _entry(dtype="F128")}), "unsupported dtype 'F128'"),
        (json.dumps({"a": _entry(shape=[-2, -8])}), "not a list of non-negative integers"),
        (json.dumps({"a": _entry(shape=[3, 3])}), "its shape [3, 3] needs 36"),
        (json.dumps({"a": _entry(data_offsets=[0, "16"])}), "are not two non-negative integers"),
        (json.dumps({"a": [1, 2]}), "'a': not an object"),
    ],
)
def test_a_lying_safetensors_header_is_one_line(tmp_path, header, problem):
    header = header.encode() if isinstance(header, str) else header
    folder = _with_header(tmp_path / "m", header)
    with pytest.raises(ConversionError) as err:
        hf_io.HFCheckpoint(folder)
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_a_single_weights_file_linked_from_outside_is_refused_but_hf_cache_links_pass(tmp_path):
    outside = _folder(tmp_path / "outside", {"a": torch.ones(2)}) / "model.safetensors"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "model.safetensors").symlink_to(outside)
    with pytest.raises(ConversionError, match="is a link to a file outside"):
        hf_io.HFCheckpoint(folder)
    # how the Hugging Face cache lays out a download: snapshots/<rev>/file -> ../../blobs/<hash>
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "1234").write_bytes(outside.read_bytes())
    snapshot = repo / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (snapshot / "model.safetensors").symlink_to("../../blobs/1234")
    assert torch.equal(hf_io.HFCheckpoint(snapshot).get("a"), torch.ones(2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_unless_allowed(tmp_path, bad):
    weights = torch.ones(3, 3)
    weights[1, 2] = bad
    ckpt = hf_io.HFCheckpoint(_folder(tmp_path / "m", {"w": weights, "ok": torch.ones(2)}))
    assert torch.equal(ckpt.get("ok"), torch.ones(2))
    with pytest.raises(ConversionError, match=r"tensor 'w' holds NaN or Inf .*--allow-non-finite"):
        ckpt.get("w")
    ckpt.allow_non_finite = True
    torch.testing.assert_close(ckpt.get("w"), weights, equal_nan=True, rtol=0, atol=0)
    writer = hf_io.ShardedWriter(tmp_path / "m", 10**9)
    with pytest.raises(ConversionError, match=r"exported tensor 'w' holds NaN or Inf"):
        writer.add("w", weights)
    hf_io.ShardedWriter(tmp_path / "m", 10**9, allow_non_finite=True).add("w", weights)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_all_finite_finds_one_nan_or_inf_anywhere(dtype):
    """The fast check (min and max) agrees with isfinite: every position of the vectorised
    body and tail, both signs, strided views; empty and integer tensors are finite."""
    gen = torch.Generator().manual_seed(0)
    for n in (1, 7, 16, 33, 130, 1027):
        clean = torch.randn(n, 3, generator=gen).to(dtype).t()  # a strided view
        assert hf_io.all_finite(clean)
        for bad in (float("nan"), float("inf"), float("-inf")):
            for pos in sorted({0, n // 2, n - 1}):
                t = clean.clone()
                t[1, pos] = bad
                assert not hf_io.all_finite(t), (n, bad, pos)
    assert hf_io.all_finite(torch.empty(0, dtype=dtype))
    assert hf_io.all_finite(torch.tensor([2**31 - 1], dtype=torch.int32))


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"hidden_size": -64}, "hidden_size=-64 must be a positive integer"),
        ({"num_layers": 2.5}, "num_layers=2.5 must be a positive integer"),
        ({"num_attention_heads": 0}, "num_attention_heads=0 must be a positive integer"),
        ({"hidden_size": 66, "num_attention_heads": 4}, "hidden_size=66 is not divisible by"),
        ({"tensor_model_parallel_size": 0}, "tensor_model_parallel_size=0 must be a positive"),
        ({"vocab_size": "128"}, "vocab_size='128' must be a positive integer"),
    ],
)
def test_non_positive_or_non_dividing_sizes_are_one_line(fields, problem):
    with pytest.raises(ConfigError) as err:
        validate_model_config(ModelConfig(**fields))
    assert problem in str(err.value) and "\n" not in str(err.value)


def _tiny_llama(path, **fields):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    folder = save_tiny(config, path)
    data = json.loads((folder / "config.json").read_text())
    data.update(fields)
    (folder / "config.json").write_text(json.dumps(data))
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return _tiny_llama(tmp_path_factory.mktemp("hostile") / "llama")


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"hidden_size": -32}, "must be a positive integer"),
        ({"num_hidden_layers": 0}, "num_layers=0 must be a positive integer"),
        ({"model_type": "no_such_model"}, "transformers cannot read"),
    ],
)
def test_a_bad_hf_config_is_one_line(tiny_llama, tmp_path, fields, problem):
    from megabridge.conversion.auto_bridge import AutoBridge

    folder = tmp_path / "m"
    folder.mkdir()
    for f in tiny_llama.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    data = json.loads((folder / "config.json").read_text())
    data.update(fields)
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(UserError) as err:
        AutoBridge.from_hf_pretrained(folder)
    assert problem in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_zero_or_negative_cli_sizes_are_refused_before_any_work(tiny_llama, tmp_path):
    args = argparse.Namespace(
        hf_path=str(tiny_llama), megatron_path=str(tmp_path / "out"), overwrite=False,
        dtype=None, tp=0, pp=1, ep=1, allow_non_finite=False, text_only=False,
    )  # fmt: skip
    with pytest.raises(UserError, match="^--tp 0: must be a positive integer$"):
        commands.cmd_hf_to_megatron(args)
    assert not (tmp_path / "out").exists()
    for flag, value in (("seq_len", 0), ("batch", -1)):
        args = argparse.Namespace(
            **{"tp": 1, "pp": 1, "ep": 1, "batch": 2, "seq_len": 32, flag: value}
        )
        dashed = "--" + flag.replace("_", "-")
        with pytest.raises(UserError, match=f"^{dashed} {value}: must be a positive integer$"):
            commands.cmd_verify(args)


def test_overwrite_may_not_destroy_the_input(tiny_llama, tmp_path):
    for out in (tiny_llama, tiny_llama / "inside", tiny_llama.parent):
        args = argparse.Namespace(
            hf_path=str(tiny_llama), megatron_path=str(out), overwrite=True,
            dtype=None, tp=1, pp=1, ep=1, allow_non_finite=False, text_only=False,
        )  # fmt: skip
        with pytest.raises(UserError, match="overlaps the input .* would destroy the input"):
            commands.cmd_hf_to_megatron(args)
    assert (tiny_llama / "config.json").is_file()
