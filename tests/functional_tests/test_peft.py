"""LoRA through the CLI: train at TP=1 and TP=2, export merged and adapter-only at TP=1 and TP=2."""

import json

import pytest
import torch

from megabridge.conversion.tiny import tiny_config
from tests.helpers import losses, megabridge, read_metrics, torchrun, train
from tests.hf_models import save_tiny

pytestmark = pytest.mark.integration

RECIPE = "llama_tiny_finetune_config"
ATOL = 1e-4


def _run(llama, root, *extra):
    return [
        f"checkpoint.pretrained_checkpoint={llama}", "dataset.type=mock", "peft.method=lora",
        "optimizer.lr=1e-2", "train.train_iters=4", "train.global_batch_size=4",
        "train.eval_interval=None", "logger.tensorboard=false",
        f"logger.log_dir={root / 'logs'}", f"checkpoint.save={root / 'ckpt'}", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny(tiny_config("llama"), tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="module")
def tp1(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("tp1")
    train(1, RECIPE, _run(llama, root))
    return root


def _export(ckpt, out, nproc=1, *extra):
    args = ["export", "--megatron-path", str(ckpt), "--hf-path", str(out / "merged"),
            "--adapter-path", str(out / "adapter"), *extra]  # fmt: skip
    result = megabridge(args) if nproc == 1 else torchrun(nproc, ["-m", "megabridge", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def exported_tp1(tp1):
    return _export(tp1 / "ckpt", tp1 / "export")


def test_tp2_losses_equal_tp1(llama, tp1, tmp_path):
    train(2, RECIPE, _run(llama, tmp_path, "model.tensor_model_parallel_size=2"))
    ref, got = read_metrics(tp1 / "logs"), read_metrics(tmp_path / "logs")
    assert [r["iteration"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a, b)
    assert ref[-1]["loss"] < ref[0]["loss"]
    saved = json.loads((tmp_path / "ckpt" / "iter_0000004" / "megabridge.json").read_text())
    assert saved["peft"]["method"] == "lora" and saved["peft"]["base"] == str(llama.resolve())


def test_exports_load_in_transformers_and_peft_and_agree(llama, exported_tp1):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(exported_tp1 / "merged"))
        merged_logits = merged(input_ids=tokens).logits
        base = AutoModelForCausalLM.from_pretrained(str(llama))
        base_logits = base(input_ids=tokens).logits
        adapted = PeftModel.from_pretrained(base, str(exported_tp1 / "adapter"))
        adapter_logits = adapted(input_ids=tokens).logits
    assert (merged_logits - adapter_logits).abs().max() <= ATOL
    assert (merged_logits - base_logits).abs().max() > 1e-2  # the adapters trained
    config = json.loads((exported_tp1 / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert (config["r"], config["lora_alpha"], config["use_dora"]) == (8, 16.0, False)
    assert (exported_tp1 / "merged" / "generation_config.json").is_file()  # the base's sidecars


def test_tp2_export_equals_tp1_export(tp1, exported_tp1, tmp_path):
    from safetensors.torch import load_file

    _export(tp1 / "ckpt", tmp_path, 2, "--tp", "2")
    for folder, name in (("merged", "model.safetensors"), ("adapter", "adapter_model.safetensors")):
        ref = load_file(str(exported_tp1 / folder / name))
        got = load_file(str(tmp_path / folder / name))
        assert sorted(ref) == sorted(got), folder
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=1e-6, atol=1e-7, msg=key)


def _one_error_line(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stdout + result.stderr, result.stderr
    assert all(n in lines[0] for n in needles), lines[0]


def test_bad_target_modules_is_a_one_line_error(llama, tmp_path):
    result = megabridge(["train", "--recipe", RECIPE, *_run(llama, tmp_path),
                         "peft.target_modules=q_proj,v_proj,c_attn"])  # fmt: skip
    _one_error_line(result, "peft.target_modules", "unknown 'c_attn'")


@pytest.mark.skipduringci
def test_dora_sequence_parallel_tp2_losses_equal_tp1(llama, tmp_path):
    """DoRA's TP-summed row norm and the sequence-parallel adapter paths (about 3 minutes)."""
    dora = ["peft.method=dora"]
    train(1, RECIPE, _run(llama, tmp_path / "a", *dora))
    train(2, RECIPE, _run(llama, tmp_path / "b", *dora, "model.tensor_model_parallel_size=2",
                          "model.sequence_parallel=true"))  # fmt: skip
    ref, got = losses(tmp_path / "a" / "logs"), losses(tmp_path / "b" / "logs")
    assert sorted(ref) == sorted(got) == [1, 2, 3, 4]
    for it in ref:
        assert got[it] == pytest.approx(ref[it], rel=1e-4), (it, ref, got)
