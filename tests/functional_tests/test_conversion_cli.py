"""`megabridge convert` / `verify` end to end: round trips, layouts, bad input, fine-tuning from a conversion."""

import json
import re

import pytest
import torch

from megabridge.conversion.tiny import tiny_config
from tests import conversion_checks as checks
from tests.helpers import losses, megabridge
from tests.hf_models import save_tiny

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny(tiny_config("llama"), tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="module")
def converted(llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("mg") / "llama_mg"
    result = megabridge(
        ["convert", "hf-to-megatron", "--hf-path", str(llama), "--megatron-path", str(out)]
    )
    assert result.returncode == 0, result.stderr
    return out


def test_cli_round_trip_is_bit_exact(llama, converted, tmp_path):
    result = megabridge(
        [
            "convert",
            "megatron-to-hf",
            "--megatron-path",
            str(converted),
            "--hf-path",
            str(tmp_path / "back"),
        ]
    )
    assert result.returncode == 0, result.stderr
    checks.assert_same_hf_folder(llama, tmp_path / "back")
    assert (tmp_path / "back" / "generation_config.json").is_file()
    # not a terminal: plain progress lines, the last one with tensors, bytes and rate
    done = [line for line in result.stderr.splitlines() if line.startswith("export: ")]
    assert re.fullmatch(r"export: (\d+)/\1 tensors, [\d.]+ [KMG]?B, .*/s in \d+s", done[-1]), done


def test_checkpoint_loads_at_tp2_with_matching_logits(llama, converted):
    rc, data = checks.verify_cli(
        llama, nproc=2, extra=["--megatron-path", str(converted), "--tp", "2", "--atol", "1e-4"]
    )
    assert rc == 0 and data["ok"] and data["max_abs_diff"] <= 1e-4, data


def test_verify_fails_with_exit_code_1_on_perturbed_weights(llama, tmp_path):
    bad = checks.perturbed_copy(llama, tmp_path / "bad")
    mg = tmp_path / "mg"
    conv = megabridge(
        ["convert", "hf-to-megatron", "--hf-path", str(bad), "--megatron-path", str(mg)]
    )
    assert conv.returncode == 0, conv.stderr
    rc, data = checks.verify_cli(llama, extra=["--megatron-path", str(mg)])
    assert rc == 1 and not data["ok"] and data["max_abs_diff"] > 1e-3, data


@pytest.mark.parametrize("source", ["megatron", "hf"])
def test_finetune_first_loss_equals_hf_loss(llama, converted, tmp_path, source):
    from transformers import AutoModelForCausalLM

    from megabridge.training.data.mock import MockDataset

    pretrained = converted if source == "megatron" else llama
    run = megabridge([
        "finetune", "--recipe", "llama_tiny_finetune_config", "--pretrained", str(pretrained),
        "dataset.type=mock", "train.train_iters=2", "train.global_batch_size=2",
        "train.micro_batch_size=1", "train.eval_interval=None",
        f"logger.log_dir={tmp_path / 'logs'}", f"checkpoint.save={tmp_path / 'ckpt'}",
    ])  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    first = losses(tmp_path / "logs")[1]
    data = MockDataset(vocab_size=256, seq_length=128, seed=1234)
    tokens = torch.stack([data[i]["tokens"] for i in range(2)])
    labels = torch.stack([data[i]["labels"] for i in range(2)])
    model = AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    hf_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    ).item()
    assert first == pytest.approx(hf_loss, abs=1e-4), (first, hf_loss, run.stdout[-2000:])


def _one_error_line(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr


def test_finetune_without_a_pretrained_model_is_refused():
    result = megabridge(["finetune", "--recipe", "llama_tiny_finetune_config"])
    _one_error_line(result, "finetune needs a pretrained model", "--pretrained")


def test_missing_folder(tmp_path):
    result = megabridge(
        [
            "convert",
            "hf-to-megatron",
            "--hf-path",
            str(tmp_path / "nope"),
            "--megatron-path",
            str(tmp_path / "out"),
        ]
    )
    _one_error_line(result, "does not exist")
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(llama, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in llama.iterdir():
        data = f.read_bytes()
        (bad / f.name).write_bytes(data[: len(data) - 100] if f.suffix == ".safetensors" else data)
    result = megabridge(
        [
            "convert",
            "hf-to-megatron",
            "--hf-path",
            str(bad),
            "--megatron-path",
            str(tmp_path / "out"),
        ]
    )
    _one_error_line(result, "model.safetensors is truncated")
    assert not (tmp_path / "out").exists()


def test_unknown_architecture_lists_supported(llama, tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    for f in llama.iterdir():
        (odd / f.name).write_bytes(f.read_bytes())
    config = json.loads((odd / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (odd / "config.json").write_text(json.dumps(config))
    result = megabridge(
        [
            "convert",
            "hf-to-megatron",
            "--hf-path",
            str(odd),
            "--megatron-path",
            str(tmp_path / "out"),
        ]
    )
    _one_error_line(result, "'FancyNewForCausalLM' is not supported", "LlamaForCausalLM")


def test_missing_unexpected_and_misshapen_tensors_are_named(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(llama / "model.safetensors"))
    cases = {
        "missing": ({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"},
                    ["lacks tensors", "model.layers.1.mlp.up_proj.weight"]),
        "unexpected": ({**tensors, "model.layers.0.mystery.weight": torch.zeros(2)},
                       ["no place for", "model.layers.0.mystery.weight"]),
        "misshapen": ({**tensors, "model.layers.0.mlp.down_proj.weight": torch.zeros(64, 64)},
                      ["shape mismatch", "decoder.layers.0.mlp.linear_fc2.weight", "(64, 64)", "(64, 128)"]),
    }  # fmt: skip
    for case, (content, needles) in cases.items():
        folder = tmp_path / case
        folder.mkdir()
        (folder / "config.json").write_text((llama / "config.json").read_text())
        save_file(content, str(folder / "model.safetensors"), metadata={"format": "pt"})
        out = tmp_path / f"{case}_out"
        result = megabridge(
            ["convert", "hf-to-megatron", "--hf-path", str(folder), "--megatron-path", str(out)]
        )
        _one_error_line(result, *needles)
        assert not out.exists() and not list(tmp_path.glob(f".{case}_out*")), case


def test_existing_output_needs_overwrite(llama, converted, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = megabridge(
        ["convert", "megatron-to-hf", "--megatron-path", str(converted), "--hf-path", str(out)]
    )
    _one_error_line(result, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    result = megabridge(
        [
            "convert",
            "megatron-to-hf",
            "--megatron-path",
            str(converted),
            "--hf-path",
            str(out),
            "--overwrite",
        ]
    )
    assert result.returncode == 0, result.stderr
    checks.assert_same_hf_folder(llama, out)
