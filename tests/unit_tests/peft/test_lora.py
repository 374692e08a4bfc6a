"""LoRA / DoRA on a tiny Llama, in this process: what trains, what stays frozen, resume, exports.

One training session per method (the training loop's own setup and train_step,
mock data, a high learning rate so the adapters move), then checks on what it
left: gradients, the optimizer, the frozen base, a resumed session, and the two
exports against the Megatron model's logits.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megabridge.conversion.tiny import tiny_config
from megabridge.errors import CheckpointError, ConfigError
from tests.hf_models import save_tiny

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_process_megatron")]

ATOL = 1e-4
ALL_HF = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
TOKENS = dict(vocab_size=256, batch=2, seq_len=16, seed=0)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    return save_tiny(tiny_config("llama"), tmp_path_factory.mktemp("hf") / "llama")


def _config(hf_dir, method, root, *extra):
    from megabridge.recipes import get_recipe
    from megabridge.training.config import apply_overrides

    cfg = get_recipe("llama_tiny_finetune_config")
    return apply_overrides(cfg, [
        f"checkpoint.pretrained_checkpoint={hf_dir}", "dataset.type=mock", f"peft.method={method}",
        f"peft.target_modules={ALL_HF}", "peft.dim=4", "optimizer.lr=1e-2",
        "scheduler.lr_warmup_iters=0", "train.global_batch_size=2", "train.eval_interval=None",
        f"checkpoint.save={root / 'ckpt'}", f"logger.log_dir={root / 'logs'}",
        "logger.tensorboard=false", *extra,
    ])  # fmt: skip


def _step(s, iteration):
    from megabridge.training.step import train_step

    loss, _, stepped, _ = train_step(
        s.cfg, s.model, s.optimizer, s.scheduler, s.train_data, iteration * 2
    )
    assert stepped
    return loss


def _params(s, trainable: bool) -> dict:
    return {
        n: p.detach().clone()
        for n, p in s.model[0].named_parameters()
        if p.requires_grad == trainable
    }


@pytest.fixture(scope="module", params=["lora", "dora"])
def trained(request, hf_llama, tmp_path_factory):
    """3 steps, save, a 4th step; then a second session resumed from the save and its 4th step."""
    from megabridge.conversion.verify import megatron_logits, sample_tokens
    from megabridge.training import loop

    root = tmp_path_factory.mktemp(request.param)
    s = loop.setup(_config(hf_llama, request.param, root))
    frozen = _params(s, trainable=False)
    for it in range(3):
        _step(s, it)
    logits = megatron_logits(s.model, sample_tokens(**TOKENS))
    s.state.iteration, s.state.consumed_samples = 3, 6
    ckpt = loop.save(s)
    for chunk in s.model:
        chunk.train()
    loss4, adapters4 = _step(s, 3), _params(s, trainable=True)
    resumed = loop.setup(_config(hf_llama, request.param, root, f"checkpoint.load={root / 'ckpt'}"))
    assert resumed.state.iteration == 3
    return SimpleNamespace(
        method=request.param, first=s, resumed=resumed, frozen=frozen, logits=logits, ckpt=ckpt,
        loss4=loss4, adapters4=adapters4, resumed_loss4=_step(resumed, 3), root=root,
    )  # fmt: skip


def test_only_adapters_get_gradients_and_optimizer_slots(trained):
    from megabridge.peft.lora import is_adapter
    from megabridge.training.step import run_microbatches

    s = trained.resumed
    (chunk,) = s.model
    names = {n for n, p in chunk.named_parameters() if p.requires_grad}
    assert names and all(is_adapter(n) for n in names)
    assert len(names) == 2 * 4 * (3 if trained.method == "dora" else 2)  # 2 layers x 4 linears
    trainable = {id(p) for p in chunk.parameters() if p.requires_grad}
    in_optimizer = {id(p) for g in s.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == trainable
    chunk.zero_grad_buffer()
    run_microbatches(s.cfg, s.model, s.train_data, 100, forward_only=False)
    for name, p in chunk.named_parameters():
        grad = getattr(p, "main_grad", None)
        if p.requires_grad:
            assert grad is not None and grad.abs().sum() > 0, name
        else:
            assert grad is None and p.grad is None, name


def test_base_bit_identical_after_training_and_adapters_moved(trained):
    for state in (trained.first, trained.resumed):
        after = _params(state, trainable=False)
        assert after.keys() == trained.frozen.keys()
        for name, before in trained.frozen.items():
            assert torch.equal(after[name], before), name
    b = {n: p for n, p in trained.adapters4.items() if n.endswith("lora_b")}
    assert b and all(p.abs().max() > 1e-3 for p in b.values())


def test_resume_continues_exactly(trained):
    assert trained.resumed_loss4 == pytest.approx(trained.loss4, rel=1e-6, abs=0)
    resumed = _params(trained.resumed, trainable=True)
    for name, value in trained.adapters4.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def exported(trained):
    from megabridge.peft.export import export_checkpoint

    out = trained.root / "export"
    export_checkpoint(trained.ckpt, hf_path=out / "merged", adapter_path=out / "adapter")
    return out


def _hf_logits(model) -> torch.Tensor:
    from megabridge.conversion.verify import sample_tokens

    with torch.no_grad():
        return model(input_ids=sample_tokens(**TOKENS)).logits.float()


def test_merged_export_gives_the_adapted_logits(trained, exported, hf_llama):
    from transformers import AutoModelForCausalLM

    merged = _hf_logits(AutoModelForCausalLM.from_pretrained(str(exported / "merged")))
    base = _hf_logits(AutoModelForCausalLM.from_pretrained(str(hf_llama)))
    ref = trained.logits[..., :256]
    assert (merged - ref).abs().max() <= ATOL
    assert (base - ref).abs().max() > 0.05  # the adapters do change the model


def test_adapter_export_loads_in_peft(trained, exported, hf_llama):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tensors = load_file(str(exported / "adapter" / "adapter_model.safetensors"))
    layer = "base_model.model.model.layers.1"
    a = [tensors[f"{layer}.self_attn.{p}_proj.lora_A.weight"] for p in "qkv"]
    assert torch.equal(a[0], a[1]) and torch.equal(a[0], a[2])  # linear_qkv's one A
    assert tensors[f"{layer}.self_attn.k_proj.lora_B.weight"].shape == (32, 4)  # 2 groups x 16
    assert (f"{layer}.mlp.up_proj.lora_magnitude_vector" in tensors) == (trained.method == "dora")
    base = AutoModelForCausalLM.from_pretrained(str(hf_llama))
    model = PeftModel.from_pretrained(base, str(exported / "adapter"))
    assert (_hf_logits(model) - trained.logits[..., :256]).abs().max() <= ATOL


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapted_model_starts_equal_to_base(hf_llama, method):
    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.conversion.verify import megatron_logits, sample_tokens
    from megabridge.peft import lora

    model = AutoBridge.from_hf_pretrained(hf_llama).to_megatron_model()
    tokens = sample_tokens(**TOKENS)
    before = megatron_logits(model, tokens)
    targets = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    lora.add_adapters(model, dict(method=method, target_modules=targets, dim=4, alpha=8.0,
                                  dropout=0.0, base=None, seed=1))  # fmt: skip
    assert torch.equal(megatron_logits(model, tokens), before)
    attn = model[0].decoder.layers[0].self_attention
    column, row = (
        attn.linear_qkv,
        attn.linear_proj,
    )  # the TP layout megatron's DDP and sharding.py read
    assert not column.lora_a.tensor_model_parallel
    assert (column.lora_b.tensor_model_parallel, column.lora_b.partition_dim) == (True, 0)
    assert (row.lora_a.tensor_model_parallel, row.lora_a.partition_dim) == (True, 1)
    assert not row.lora_b.tensor_model_parallel
    assert float(column.lora_a.abs().max()) <= 1 / 64**0.5 and column.lora_b.abs().max() == 0


def test_target_module_errors():
    from megabridge.peft.lora import resolve_targets

    assert resolve_targets(["v_proj", "q_proj", "k_proj", "linear_fc2"], "llama") == [
        "linear_qkv",
        "linear_fc2",
    ]
    cases = {
        ("q_proj", "c_attn"): ["unknown 'c_attn'", "linear_qkv", "gate_proj"],
        ("q_proj", "v_proj"): ["names q_proj, v_proj but not k_proj", "linear_qkv"],
        ("gate_proj",): ["but not up_proj", "linear_fc1"],
        (): ["empty"],
    }
    for names, needles in cases.items():
        with pytest.raises(ConfigError) as e:
            resolve_targets(list(names), "llama")
        assert all(n in str(e.value) for n in needles), str(e.value)
    with pytest.raises(ConfigError, match="model.family='gpt' has none"):
        resolve_targets(["q_proj"], "gpt")


def test_config_validation_names_every_peft_problem(hf_llama, tmp_path):
    from megabridge.training.config import validate

    cfg = _config(hf_llama, "lora", tmp_path, "peft.target_modules=q_proj", "peft.dim=0")
    with pytest.raises(ConfigError) as e:
        validate(cfg, 1)
    assert "peft.dim=0 must be >= 1" in str(e.value) and "but not k_proj" in str(e.value)
    assert "\n" not in str(e.value)


def test_model_without_the_layer_is_refused(hf_llama):
    from megatron.core.transformer.identity_op import IdentityOp

    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.peft import lora

    # Layers without an MLP, as in Megatron-Core's hybrid specs.
    model = AutoBridge.from_hf_pretrained(hf_llama).to_megatron_model(load_weights=False)
    for layer in model[0].decoder.layers:
        layer.mlp = IdentityOp()
    settings = dict(method="lora", target_modules=["linear_qkv", "linear_fc1"], dim=2,
                    alpha=4.0, dropout=0.0, base=None, seed=1)  # fmt: skip
    with pytest.raises(ConfigError, match="this model has no linear_fc1 layer to adapt"):
        lora.add_adapters(model, settings)


def test_adapter_checkpoint_is_not_a_full_checkpoint(trained, hf_llama):
    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.training import checkpointing

    model = AutoBridge.from_hf_pretrained(hf_llama).to_megatron_model()
    with pytest.raises(CheckpointError, match="holding the adapters only: export it"):
        checkpointing.load(trained.ckpt, model, model_only=True)


def test_export_refuses_a_full_checkpoint(tmp_path, monkeypatch):
    from megabridge.errors import UserError
    from megabridge.peft.export import export_checkpoint
    from megabridge.training import checkpointing

    full = tmp_path / "full"  # what a full-model checkpoint's metadata says: no "peft"
    full.mkdir()
    (full / "megabridge.json").write_text(json.dumps({"model_config": {}, "iteration": 0}))
    (full / "metadata.json").write_text("{}")
    # only megabridge.json here: skip the integrity check (tested in training/) to reach export's
    monkeypatch.setattr(checkpointing, "resolve", Path)
    with pytest.raises(UserError, match="has no LoRA/DoRA adapters.*convert megatron-to-hf"):
        export_checkpoint(full, hf_path=tmp_path / "out")
    with pytest.raises(UserError, match="nothing to export"):
        export_checkpoint(full)
    # the CLI's inputs (command_paths.EXPORT_INPUTS): a merged model written into the
    # reference folder would destroy it
    reference = tmp_path / "reference"
    reference.mkdir()
    with pytest.raises(UserError, match="overlaps the input"):
        export_checkpoint(full, hf_path=reference / "merged", hf_reference=reference)


def test_moe_lora_recipe_adapts_the_attention_and_exports(tmp_path):
    """An all-MoE model (Qwen3-MoE) has no dense MLP, so its LoRA recipe adapts the attention
    only: that alone trains, and both exports reproduce the adapted Megatron model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from megabridge.conversion.verify import megatron_logits, sample_tokens
    from megabridge.peft.export import export_checkpoint
    from megabridge.peft.lora import is_adapter
    from megabridge.recipes import as_lora, get_recipe
    from megabridge.training import loop
    from megabridge.training.config import apply_overrides

    hf_dir = save_tiny(tiny_config("qwen3_moe"), tmp_path / "hf")
    cfg = as_lora(get_recipe("qwen3_moe_tiny_pretrain_config"))
    assert cfg.peft.target_modules == ["linear_qkv", "linear_proj"]
    apply_overrides(cfg, [
        f"checkpoint.pretrained_checkpoint={hf_dir}", "peft.dim=4", "optimizer.lr=1e-2",
        "scheduler.lr_warmup_iters=0", "train.global_batch_size=2", "train.micro_batch_size=1",
        "train.eval_interval=None", f"checkpoint.save={tmp_path / 'ckpt'}",
        f"logger.log_dir={tmp_path / 'logs'}", "logger.tensorboard=false",
    ])  # fmt: skip
    s = loop.setup(cfg)
    frozen = _params(s, trainable=False)
    trainable = _params(s, trainable=True)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (linear_qkv, linear_proj) x (A, B)
    assert all(is_adapter(n) and ".self_attention." in n for n in trainable)
    for it in range(3):
        _step(s, it)
    after = _params(s, trainable=False)
    assert all(torch.equal(after[n], before) for n, before in frozen.items())
    logits = megatron_logits(s.model, sample_tokens(**TOKENS))[..., :256]
    s.state.iteration, s.state.consumed_samples = 3, 6
    out = tmp_path / "export"
    export_checkpoint(loop.save(s), hf_path=out / "merged", adapter_path=out / "adapter")

    merged = _hf_logits(AutoModelForCausalLM.from_pretrained(str(out / "merged")))
    assert (merged - logits).abs().max() <= ATOL
    base = AutoModelForCausalLM.from_pretrained(str(hf_dir))
    assert (_hf_logits(base) - logits).abs().max() > 1e-2  # the adapters do change the model
    adapted = PeftModel.from_pretrained(base, str(out / "adapter"))
    assert (_hf_logits(adapted) - logits).abs().max() <= ATOL


def test_default_targets_follow_the_model():
    from megabridge.peft.lora import default_targets
    from megabridge.recipes import get_recipe

    expected = {
        "llama31_8b_lora_config": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
        "qwen3_30b_a3b_lora_config": ["linear_qkv", "linear_proj"],  # every layer MoE
        "mixtral_8x7b_lora_config": ["linear_qkv", "linear_proj"],
        "deepseek_v3_lora_config": ["linear_proj", "linear_fc1", "linear_fc2"],  # MLA, 3 dense
    }
    for name, targets in expected.items():
        cfg = get_recipe(name)
        assert cfg.peft.target_modules == targets == default_targets(cfg.model), name
    # A LoRA recipe keeps its SFT recipe's layout and batch (DeepSeek-V3: 64 data-parallel ranks).
    sft, adapted = get_recipe("deepseek_v3_finetune_config"), get_recipe("deepseek_v3_lora_config")
    assert adapted.train.global_batch_size == sft.train.global_batch_size == 128
    assert adapted.model.expert_model_parallel_size == 64
    assert adapted.optimizer.use_distributed_optimizer
