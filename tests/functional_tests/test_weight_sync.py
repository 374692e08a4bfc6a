"""Weight sync into a live transformers model and checkpoint.save_hf, at TP=2, PP=2 (with LoRA)
and EP=2: one 2-process launch of tests/weight_sync_check.py runs every case."""

import json

import pytest

from megabridge.conversion.tiny import tiny_config
from tests.helpers import REPO, torchrun
from tests.hf_models import save_tiny

pytestmark = pytest.mark.integration

ATOL = 1e-4
LLAMA = "llama_tiny_finetune_config"
CASES = [  # name, recipe, family, layout (tp, pp, ep), dst (None: every rank), lora, errors
    ("tp2", LLAMA, "llama", (2, 1, 1), None, False, True),
    ("pp2_lora", LLAMA, "llama", (1, 2, 1), 0, True, False),  # rank 1's stage sent to rank 0
    ("ep2", "qwen3_moe_tiny_pretrain_config", "qwen3_moe", (1, 1, 2), 1, False, False),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("sync")
    hf = {f: save_tiny(tiny_config(f), root / f"hf_{f}") for f in ("llama", "qwen3_moe")}
    plan = {
        "cases": [
            {"name": name, "recipe": recipe, "hf_dir": str(hf[family]),
             "layout": dict(zip(("tp", "pp", "ep"), layout, strict=True)), "dst": dst,
             "lora": lora, "errors": errors, "work": str(root / name),
             # the distributed optimizer gathers updated weights lazily: the sync must not
             "overlap_param_gather": name == "ep2"}
            for name, recipe, family, layout, dst, lora, errors in CASES
        ]
    }  # fmt: skip
    (root / "plan.json").write_text(json.dumps(plan))
    out = torchrun(2, [str(REPO / "tests" / "weight_sync_check.py"), str(root / "plan.json")])
    records = {}
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            record = json.loads(line.removeprefix("RESULT "))
            records[record["case"]] = record
    assert out.returncode == 0, (
        json.dumps(records, indent=1)[-3000:] + out.stdout[-2000:] + out.stderr[-4000:]
    )
    return records


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_synced_model_gives_the_megatron_logits_and_follows_training(results, case):
    record = results[case]
    assert "error" not in record, record.get("error")
    dst = next(c[4] for c in CASES if c[0] == case)
    for round_ in ("sync1", "sync2"):
        r = record[round_]
        assert r["ranks"] == ([0, 1] if dst is None else [dst]), r
        assert r["max_abs_diff"] < ATOL, (round_, r)
        assert r["moved"] > 1e-3, (round_, r)  # training changed the logits, and the sync saw it
        assert min(r["tensors"]) > 8, r  # every HF tensor, in several 64 KiB buckets
    # one sync plan served both rounds: training updated the weights in place
    assert record["plan_builds"] == [1, 1], record["plan_builds"]


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_save_hf_copy_loads_in_transformers_with_the_same_logits(results, case):
    record = results[case]
    assert record["saved_hf_max_abs_diff"] < ATOL, record
    assert record["resumable"], record  # the checkpoint holding it is still complete
    files = set(record["saved_hf_files"])
    if case.endswith("lora"):
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
    else:
        assert {"config.json", "generation_config.json"} <= files, files
        assert any(f.endswith(".safetensors") for f in files), files


def test_bad_consumers_fail_the_same_way_on_every_rank_and_never_hang(results):
    errors = results["tp2"]["errors"]
    expected = {
        "missing_name_on_rank1": ("rank 1", "has no tensor model.layers.1."),
        "shape_mismatch_on_rank0": ("rank 0", "shape mismatch for model.layers.0.mlp."),
        "raising_consumer_on_dst0": ("rank 0", "RuntimeError: engine out of memory"),
    }
    for name, (where, what) in expected.items():
        messages = errors[name]
        assert messages[0] == messages[1], (name, messages)  # the same error on both ranks
        assert messages[0].startswith(f"ConversionError: weight sync failed on {where}"), messages
        assert what in messages[0], messages
    assert errors["closed_early"][0] == 2 and errors["closed_early"][1] > 2, errors
    assert errors["after_errors_max_abs_diff"] < ATOL, errors
