"""Checkpoints Megatron-LM, Megatron-Bridge and NeMo 2 wrote export bit-exact to the HF model
they came from, streamed and through a built model; legacy pickles are refused unread."""

import pickle

import pytest
import torch
from safetensors.torch import load_file

from megabridge.conversion.tiny import tiny_config
from tests import foreign_checkpoints
from tests.helpers import megabridge
from tests.hf_models import save_tiny

pytestmark = pytest.mark.unit


def hf_tensors(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def assert_same_tensors(expected_dir, actual_dir):
    expected, actual = hf_tensors(expected_dir), hf_tensors(actual_dir)
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def make_foreign(kind, tmp_path, dtype):
    from megabridge.conversion.auto_bridge import AutoBridge

    hf = save_tiny(tiny_config("llama"), tmp_path / "hf", dtype=dtype)
    bridge = AutoBridge.from_hf_pretrained(hf)
    cfg = bridge.to_megatron_provider()
    cfg.bf16 = dtype == torch.bfloat16
    model = bridge.to_megatron_model(cfg)
    return hf, foreign_checkpoints.write(kind, tmp_path / kind, model, cfg)


@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("kind", foreign_checkpoints.KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_foreign_checkpoint_exports_bit_exact_streamed_and_built(kind, dtype, tmp_path):
    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.training import checkpointing

    hf, ckpt = make_foreign(kind, tmp_path, dtype)
    bridge = AutoBridge.from_megatron_checkpoint(ckpt)
    assert bridge.checkpoint_meta["foreign"]["kind"] == kind
    assert bridge.model_config.family == "llama"
    assert bridge.save_hf_from_checkpoint(tmp_path / "streamed") is not None
    assert_same_tensors(hf, tmp_path / "streamed")

    model = bridge.to_megatron_model()  # through checkpointing.load, as training loads it
    bridge.save_hf_pretrained(model, tmp_path / "built")
    assert_same_tensors(hf, tmp_path / "built")
    checkpointing.check_architecture(checkpointing.resolve(ckpt), bridge.model_config)


@pytest.mark.usefixtures("single_process_megatron")
def test_hf_config_stands_in_for_a_missing_description(tmp_path):
    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.errors import UserError

    hf, ckpt = make_foreign("megatron-bridge", tmp_path, torch.float32)
    run_config = ckpt / "iter_0000010" / "run_config.yaml"
    run_config.write_text("train: {train_iters: 10}\n")  # no model section
    with pytest.raises(UserError, match="pass --hf-config"):
        AutoBridge.from_megatron_checkpoint(ckpt)
    bridge = AutoBridge.from_megatron_checkpoint(ckpt, hf_config=hf / "config.json")
    bridge.save_hf_from_checkpoint(tmp_path / "out")
    assert_same_tensors(hf, tmp_path / "out")


class _Plant:
    """Unpickling this creates a marker file: what a crafted checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_legacy_pickle_checkpoint_is_refused_unread(tmp_path):
    marker = tmp_path / "code-ran"
    rank_dir = tmp_path / "ckpt" / "iter_0000010" / "mp_rank_00"
    rank_dir.mkdir(parents=True)
    (rank_dir / "model_optim_rng.pt").write_bytes(pickle.dumps({"model": _Plant(marker)}))
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("10")
    result = megabridge(
        ["convert", "megatron-to-hf", "--megatron-path", str(tmp_path / "ckpt"),
         "--hf-path", str(tmp_path / "out")]
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "legacy (non-distributed) Megatron-LM checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.usefixtures("single_process_megatron")
def test_megatron_layout_is_a_save_folder_both_tools_describe(tmp_path):
    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.models.config import architecture
    from megabridge.training import checkpointing, foreign, megatron_layout, trust

    hf = save_tiny(tiny_config("llama"), tmp_path / "hf", dtype=torch.bfloat16)
    bridge = AutoBridge.from_hf_pretrained(hf)
    cfg = bridge.to_megatron_provider()
    cfg.bf16 = True
    out = bridge.save_megatron_checkpoint(tmp_path / "mg", cfg)
    megatron_layout.write(out, cfg)
    ckpt = checkpointing.resolve(out)  # megabridge.json sealed again with every file
    assert ckpt == out / "iter_0000000"
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "0"
    args = trust.load_common_state(ckpt)["args"]  # what Megatron-LM reads, read safely
    assert (args.num_layers, args.num_query_groups, args.padded_vocab_size) == (2, 2, 256)
    bridge_back = AutoBridge.from_megatron_checkpoint(out)
    bridge_back.save_hf_from_checkpoint(tmp_path / "back")
    assert_same_tensors(hf, tmp_path / "back")

    for kind, stray in (("megatron-bridge", None), ("megatron-lm", "run_config.yaml")):
        (ckpt / checkpointing.METADATA).unlink(missing_ok=True)  # as the tools see it
        if stray:
            (ckpt / stray).unlink()
        meta = foreign.metadata(ckpt)
        assert meta["foreign"]["kind"] == kind
        assert meta["model"] == architecture(cfg) | {"vocab_size": 256}


@pytest.mark.usefixtures("single_process_megatron")
def test_training_takes_a_described_nowhere_checkpoint_with_checkpoint_hf_config(tmp_path):
    """checkpoint.pretrained_checkpoint of a checkpoint with no model description: one line
    naming checkpoint.hf_config; with it, the model's shape and its weights are the HF model's."""
    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.errors import UserError
    from megabridge.models.config import architecture
    from megabridge.models.llama.recipes import llama_tiny_finetune_config
    from megabridge.models.provider import build_model
    from megabridge.training import loop

    hf, ckpt = make_foreign("megatron-bridge", tmp_path, torch.float32)
    (ckpt / "iter_0000010" / "run_config.yaml").write_text("train: {train_iters: 10}\n")
    cfg = llama_tiny_finetune_config()
    cfg.checkpoint.pretrained_checkpoint = str(ckpt)
    with pytest.raises(UserError, match=r"training: checkpoint\.hf_config="):
        loop._adopt_pretrained_architecture(cfg)
    cfg.checkpoint.hf_config = str(hf / "config.json")
    loop._adopt_pretrained_architecture(cfg)
    reference = AutoBridge.from_hf_pretrained(hf)
    assert architecture(cfg.model) == architecture(reference.model_config)
    model = build_model(cfg.model)
    loop._load_pretrained(cfg, model)
    expected = dict(reference.to_megatron_model(cfg.model)[0].named_parameters())
    loaded = dict(model[0].named_parameters())
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.usefixtures("single_process_megatron")
def test_lora_on_an_undescribed_foreign_base_exports_like_convert(tmp_path):
    """LoRA from a foreign checkpoint described by checkpoint.hf_config: the saved adapters
    record it, so `export` rebuilds the base without being told; the merged model of adapters
    that have not moved (B = 0) is the HF model, bit for bit."""
    from megabridge.models.llama.recipes import llama_tiny_finetune_config
    from megabridge.peft.export import export_checkpoint
    from megabridge.training import loop
    from megabridge.training.config import apply_overrides

    hf, ckpt = make_foreign("megatron-bridge", tmp_path, torch.float32)
    (ckpt / "iter_0000010" / "run_config.yaml").write_text("train: {train_iters: 10}\n")
    cfg = apply_overrides(llama_tiny_finetune_config(), [
        f"checkpoint.pretrained_checkpoint={ckpt}", f"checkpoint.hf_config={hf}",
        "dataset.type=mock", "peft.method=lora", "peft.dim=4", "train.eval_interval=None",
        f"checkpoint.save={tmp_path / 'ckpt'}", f"logger.log_dir={tmp_path / 'logs'}",
        "logger.tensorboard=false",
    ])  # fmt: skip
    s = loop.setup(cfg)
    s.state.iteration = 1
    saved = loop.save(s)
    export_checkpoint(saved, hf_path=tmp_path / "merged", adapter_path=tmp_path / "adapter")
    assert_same_tensors(hf, tmp_path / "merged")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "glm4_moe"])
def test_megatron_lm_moe_arguments_name_the_one_family_they_fit(family, tmp_path):
    from megabridge.conversion.registry import bridge_for_family
    from megabridge.training import foreign

    cfg = bridge_for_family(family).model_config(tiny_config(family))
    args = vars(foreign_checkpoints.megatron_lm_args(cfg, cfg.vocab_size))
    found = foreign._moe_family_config(args, tmp_path)
    assert found.family == family
    assert (found.num_moe_experts, found.moe_router_topk) == (
        cfg.num_moe_experts,
        cfg.moe_router_topk,
    )


def test_megatron_lm_moe_arguments_that_fit_no_family_name_the_candidates(tmp_path):
    from megabridge.conversion.registry import bridge_for_family
    from megabridge.errors import UserError
    from megabridge.training import foreign

    cfg = bridge_for_family("qwen3_moe").model_config(tiny_config("qwen3_moe"))
    args = vars(foreign_checkpoints.megatron_lm_args(cfg, cfg.vocab_size))
    args["moe_router_score_function"] = "sigmoid"  # no MoE family routes so without more
    with pytest.raises(UserError, match=r"fit none of megabridge's MoE families \(.*mixtral.*"
                       r"qwen3_moe.*\): pass --hf-config"):  # fmt: skip
        foreign._moe_family_config(args, tmp_path)
