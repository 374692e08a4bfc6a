"""Checks on converted models: exact round trips, logits and gradients vs transformers.

The conformance suite (tests/unit_tests/models/test_conformance.py) runs them on every
family's tiny models; its multi-process half is tests/parallel_check.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.helpers import megabridge, torchrun

ATOL_FP32 = 1e-4
INDEX = "model.safetensors.index.json"


def assert_same_hf_folder(expected: Path, actual: Path) -> None:
    """Same tensor names, dtypes and bytes; same config.json; the same shards if sharded."""
    assert_same_tensors(expected, actual)
    assert json.loads((expected / "config.json").read_text()) == json.loads(
        (actual / "config.json").read_text()
    )
    if (expected / INDEX).exists():
        weight_map = json.loads((expected / INDEX).read_text())["weight_map"]
        assert json.loads((actual / INDEX).read_text())["weight_map"] == weight_map


def assert_same_tensors(expected: Path, actual: Path) -> None:
    """Same tensor names, dtypes and bytes."""
    from megabridge.conversion.hf_io import HFCheckpoint

    a, b = HFCheckpoint(expected), HFCheckpoint(actual)
    assert sorted(a.keys()) == sorted(b.keys()), set(a.keys()) ^ set(b.keys())
    for name in a.keys():
        ta, tb = a.get(name), b.get(name)
        assert ta.dtype == tb.dtype, name
        assert ta.shape == tb.shape, name
        assert torch.equal(ta.view(torch.uint8) if ta.dtype != torch.bool else ta,
                           tb.view(torch.uint8) if tb.dtype != torch.bool else tb), f"bytes differ: {name}"  # fmt: skip


def hf_first_loss(hf_dir: Path, samples: int = 2) -> float:
    """transformers' loss of the HF model on the mock data's first samples (the tiny recipes')."""
    from transformers import AutoModelForCausalLM

    from megabridge.training.data.mock import MockDataset

    data = MockDataset(vocab_size=256, seq_length=128, seed=1234)
    tokens = torch.stack([data[i]["tokens"] for i in range(samples)])
    labels = torch.stack([data[i]["labels"] for i in range(samples)])
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    ).item()


def round_trip_in_process(hf_dir: Path, out: Path) -> None:
    """HF -> Megatron model (this process, TP=1) -> HF folder; must be bit-exact."""
    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.training.console import parameter_counts

    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    model = bridge.to_megatron_model()
    bridge.save_hf_pretrained(model, out)
    assert_same_hf_folder(hf_dir, out)
    # the count a training run's summary prints
    assert parameter_counts(model, 1, 1, 1)[0] == hf_parameter_count(hf_dir)


def logits_in_process(hf_dir: Path, atol: float = ATOL_FP32):
    from megabridge.conversion.verify import verify

    result = verify(hf_dir, atol=atol)
    assert result.ok, result
    assert result.max_abs_diff <= atol and result.top1_agreement == 1.0, result
    return result


def config_round_trip(hf_config) -> None:
    """HF config -> ModelConfig -> exported config.json -> ModelConfig: nothing lost or changed."""
    from transformers import AutoConfig

    from megabridge.conversion.registry import bridge_for

    bridge = bridge_for(hf_config.architectures[0])
    cfg = bridge.model_config(hf_config)
    data = bridge.hf_config_dict(cfg)
    again = bridge.model_config(AutoConfig.for_model(data.pop("model_type"), **data))
    assert again == cfg, (cfg, again)


def perturbed_copy(hf_dir: Path, out: Path, scale: float = 1.05, tensor: str = "layers.0.") -> Path:
    """The same HF model with one weight matrix (the first named ``*tensor*``) scaled.

    Pick one whose output does not reach a norm linearly: Gemma norms what o_proj
    and down_proj produce, so scaling v/o/up/down_proj changes no logit.
    """
    from safetensors.torch import load_file, save_file

    files = {f: load_file(str(f)) for f in hf_dir.glob("*.safetensors")}
    names = sorted(n for t in files.values() for n in t if tensor in n and t[n].dim() == 2)
    assert names, f"no matrix named *{tensor}* in {hf_dir}"
    out.mkdir()
    for f in hf_dir.iterdir():
        if names[0] in files.get(f, {}):
            tensors = files[f]
            tensors[names[0]] = tensors[names[0]] * scale
            save_file(tensors, str(out / f.name), metadata={"format": "pt"})
        else:
            (out / f.name).write_bytes(f.read_bytes())
    return out


def to_megatron_checkpoint(hf_dir: Path, out: Path) -> Path:
    """HF folder -> Megatron distributed checkpoint, in this process (streamed)."""
    from megabridge.conversion.auto_bridge import AutoBridge

    return AutoBridge.from_hf_pretrained(hf_dir).save_megatron_checkpoint(out)


def verify_perturbed_rejected_in_process(
    hf_dir: Path, tmp: Path, atol: float = ATOL_FP32, tensor: str = "layers.0."
) -> float:
    """A Megatron checkpoint of the model passes verify against it; one of a perturbed copy fails."""
    from megabridge.conversion.verify import verify

    good = verify(hf_dir, megatron_path=to_megatron_checkpoint(hf_dir, tmp / "good"), atol=atol)
    assert good.ok and good.max_abs_diff <= atol, good
    bad_hf = perturbed_copy(hf_dir, tmp / "bad_hf", tensor=tensor)
    bad = verify(hf_dir, megatron_path=to_megatron_checkpoint(bad_hf, tmp / "bad"), atol=atol)
    assert not bad.ok and bad.max_abs_diff > 1e-3, bad
    return bad.max_abs_diff


def verify_cli(hf_dir: Path, nproc: int = 1, extra: list[str] = ()) -> tuple[int, dict]:
    args = ["verify", "--hf-path", str(hf_dir), "--json", *extra]
    if nproc == 1:
        result = megabridge(args)
    else:
        result = torchrun(nproc, ["-m", "megabridge", *args])
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr[-3000:]
    return result.returncode, json.loads(lines[-1])


def gradients_in_process(hf_dir: Path, rtol: float = 1e-4) -> float:
    """Every weight's gradient of sum(logits * r), Megatron's mapped to HF names, vs transformers'.

    Returns the largest difference relative to the largest gradient of its tensor.
    """
    from transformers import AutoModelForCausalLM

    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.conversion.verify import sample_tokens

    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    cfg = bridge.model_config
    tokens = sample_tokens(cfg.vocab_size, 2, 32, seed=0)
    r = torch.randn(2, 32, cfg.vocab_size, generator=torch.Generator().manual_seed(1))
    (model,) = bridge.to_megatron_model()
    positions = torch.arange(32).expand(2, 32)
    (model(tokens, positions, None)[..., : cfg.vocab_size] * r).sum().backward()
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    (hf(input_ids=tokens).logits * r).sum().backward()
    hf_grads = {name: p.grad for name, p in hf.named_parameters()}
    worst, checked = 0.0, set()
    for name, param in model.named_parameters():
        mapping, hf_names = bridge.family.resolve(name)
        for hf_name, grad in zip(hf_names, mapping.megatron_to_hf(param.grad, cfg), strict=True):
            ref = hf_grads[hf_name]
            worst = max(worst, ((grad - ref).abs().max() / ref.abs().max()).item())
            checked.add(hf_name)
    assert checked == set(hf_grads), set(hf_grads) ^ checked
    assert worst <= rtol, worst
    return worst


def export_from_scratch_in_process(recipe: str, out: Path) -> None:
    """A freshly initialised model of ``recipe`` -> HF folder (config from the family's tables),
    which transformers must load and run like the Megatron model."""
    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.conversion.registry import bridge_for_family
    from megabridge.models import init
    from megabridge.recipes import get_recipe

    cfg = get_recipe(recipe).model
    family = bridge_for_family(cfg.family)
    bridge = AutoBridge(family, cfg, family.hf_config_dict(cfg))
    model = bridge.to_megatron_model(load_weights=False)
    init.initialize(model, cfg, seed=1234)
    bridge.save_hf_pretrained(model, out)
    logits_in_process(out)


def hf_parameter_count(hf_dir: Path) -> int:
    """Parameters of transformers' own model of ``hf_dir`` (tied ones once)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    return sum(p.numel() for p in model.parameters())
