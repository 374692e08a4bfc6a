"""MXFP4 import (GPT-OSS's official checkpoints): dequantized exactly as transformers does.

The tiny model's experts are quantized here to MXFP4 and stored as the published
checkpoints store them (``*_blocks`` + ``*_scales``, ``quantization_config``); the reference
is transformers' own model holding transformers' own dequantization of those blocks.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from megabridge.conversion import quantized
from megabridge.conversion.tiny import tiny_config
from megabridge.errors import UserError

pytestmark = pytest.mark.unit

QUANTIZATION = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}  # fmt: skip
EXPERT_WEIGHTS = ("experts.gate_up_proj", "experts.down_proj")


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, in, out] -> MXFP4 blocks [E, out, in/32, 16] and scales [E, out, in/32] (nearest)."""
    rows = w.transpose(1, 2).float()  # the checkpoint's [E, out, in]
    groups = rows.reshape(*rows.shape[:2], -1, quantized.MXFP4_BLOCK)
    amax = groups.abs().amax(-1, keepdim=True).clamp(min=2.0**-100)
    exponent = torch.ceil(torch.log2(amax / 6.0))  # |x| / 2^e <= 6, the largest e2m1 value
    lut = torch.tensor(quantized.FP4_E2M1)
    codes = ((groups / 2.0**exponent).unsqueeze(-1) - lut).abs().argmin(-1)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (exponent.squeeze(-1) + quantized.E8M0_BIAS).to(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_dequantize_is_transformers(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 4, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(110, 140, (3, 8, 4), generator=gen, dtype=torch.uint8)
    ours = quantized.mxfp4_dequantize("w", blocks, scales, dtype)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert ours.shape == theirs.shape == (3, 128, 8)
    assert torch.equal(ours, theirs)


@pytest.fixture(scope="module")
def mxfp4_model(tmp_path_factory):
    """(folder with an MXFP4 checkpoint, transformers' model of what it dequantizes to)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from tests.hf_models import randomize

    config = tiny_config("gpt_oss")
    model = AutoModelForCausalLM.from_config(config)
    randomize(model, seed=3)
    tensors = {}
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith(EXPERT_WEIGHTS):
                blocks, scales = quantize(t)
                tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
                t.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
            else:
                tensors[name] = t.contiguous()
    folder = tmp_path_factory.mktemp("mxfp4") / "hf"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    data = {**config.to_dict(), "quantization_config": QUANTIZATION}
    (folder / "config.json").write_text(json.dumps(data))
    return folder, model.eval()


def test_reader_lists_and_dequantizes(mxfp4_model):
    from safetensors import safe_open
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from megabridge.conversion.hf_io import HFCheckpoint

    folder, _ = mxfp4_model
    reader = HFCheckpoint(folder)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    assert name in reader.keys() and f"{name}_blocks" not in reader.keys()
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        blocks, scales = f.get_tensor(f"{name}_blocks"), f.get_tensor(f"{name}_scales")
    expected = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    assert reader.dtype(name) == torch.bfloat16 and reader.shape(name) == tuple(expected.shape)
    assert torch.equal(reader.get(name), expected)


@pytest.mark.usefixtures("single_process_megatron")
def test_mxfp4_checkpoint_converts_and_exports_bf16(mxfp4_model, tmp_path):
    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.conversion.hf_io import HFCheckpoint
    from megabridge.conversion.verify import megatron_logits, sample_tokens

    folder, reference = mxfp4_model
    bridge = AutoBridge.from_hf_pretrained(folder)
    model = bridge.to_megatron_model()
    tokens = sample_tokens(reference.config.vocab_size, 2, 32, seed=0)
    with torch.no_grad():
        expected = reference(input_ids=tokens).logits
    logits = megatron_logits(model, tokens)[..., : reference.config.vocab_size]
    assert (logits - expected).abs().max().item() <= 1e-4

    out = bridge.save_hf_pretrained(model, tmp_path / "back")
    exported = HFCheckpoint(out)
    assert "quantization_config" not in exported.config_dict
    state = reference.state_dict()
    for name in exported.keys():
        if name.endswith(EXPERT_WEIGHTS):  # bf16 (the dequantized values are exact in it)
            assert exported.dtype(name) == torch.bfloat16, name
        assert torch.equal(exported.get(name).float(), state[name].float()), name
    assert sorted(exported.keys()) == sorted(state)


def test_blocks_without_scales_are_refused_in_one_line(mxfp4_model, tmp_path):
    from safetensors.torch import load_file

    from megabridge.conversion.hf_io import HFCheckpoint

    folder, _ = mxfp4_model
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.0.mlp.experts.down_proj_scales"]
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    (broken / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(UserError, match=r"down_proj_blocks has no \S+down_proj_scales$"):
        HFCheckpoint(broken)


def test_mismatched_scales_are_refused():
    blocks = torch.zeros(2, 8, 4, 16, dtype=torch.uint8)
    with pytest.raises(UserError, match="do not fit scales"):
        quantized.mxfp4_dequantize("w", blocks, torch.zeros(2, 8, 3, dtype=torch.uint8))
