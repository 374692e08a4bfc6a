"""One conformance suite for every registered family and every variant of its tiny.py.

Each (family, variant) is a tiny random model of transformers' own classes
(megabridge.conversion.tiny). In this process: config round trip, bit-exact
HF -> Megatron -> HF in fp32 (from a sharded folder with an index) and bf16, logits
within 1e-4 of transformers' in fp32, gradients (dense families), verify rejecting a
perturbed copy, a model from scratch exporting to transformers. In one two-process
launch for all families (tests/parallel_check.py): a bit-exact round trip through a Megatron
checkpoint and logits within 1e-4 at TP=2, PP=2 and, for MoE families, EP=2; for the
base variant of dense families, gradients at TP=2 resharded from a TP=1 checkpoint.
Adding a family, or a variant, touches only its folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megabridge.conversion.registry import bridge_for_family
from megabridge.conversion.tiny import families, tiny_config, tiny_module, variants
from megabridge.models import torch_layers
from tests import conversion_checks as checks
from tests.helpers import torchrun
from tests.hf_models import save_tiny


def _variants(family: str) -> dict[str, dict]:
    """The family's variants; none without a tiny.py (test_family_declares_tiny_models says so)."""
    try:
        return variants(family)
    except ModuleNotFoundError as e:
        if e.name != f"megabridge.models.{family}.tiny":
            raise
        return {}


FAMILIES = families()
CASES = [(family, variant) for family in FAMILIES for variant in _variants(family)]
CASE_IDS = [f"{family}-{variant}" for family, variant in CASES]
SHARD_BYTES = 48_000  # several shards even for the smallest tiny model
PARALLEL_CHECK = Path(checks.__file__).with_name("parallel_check.py")

# What a family's PARALLELISM names, at two processes.
LAYOUTS = {
    "TP": ("tp2", {"tp": 2, "pp": 1, "ep": 1}),
    "PP": ("pp2", {"tp": 1, "pp": 2, "ep": 1}),
    "EP": ("ep2", {"tp": 1, "pp": 1, "ep": 2}),
}


def layouts(family: str) -> dict[str, dict]:
    return dict(LAYOUTS[p] for p in bridge_for_family(family).PARALLELISM)


def has_experts(family: str) -> bool:
    return "EP" in bridge_for_family(family).PARALLELISM


def parallel_checks(family: str, variant: str) -> list[str]:
    """A layout's name (logits and round trip there), or gradients_tp2 (dense, base)."""
    dense_base = not has_experts(family) and variant == "base"
    return [*layouts(family), *(["gradients_tp2"] if dense_base else [])]


PARALLEL_CASES = [(f, v, c) for f, v in CASES for c in parallel_checks(f, v)]
# CI (2 cores) runs every family's base variant at every layout; the other variants run
# there at TP=1 and, at TP=2 / PP=2 / EP=2, in the nightly tier
# (tests/functional_tests/launch_scripts/active/L1_Launch_conformance_variants.sh).
PARALLEL_PARAMS = [
    pytest.param(*case, id="-".join(case),
                 marks=() if case[1] == "base" else pytest.mark.skipduringci)
    for case in PARALLEL_CASES
]  # fmt: skip


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """(family, variant, dtype) -> a saved tiny model; fp32 ones sharded, with an index."""
    saved = {}

    def get(family: str, variant: str, dtype: torch.dtype = torch.float32) -> Path:
        key = (family, variant, dtype)
        if key not in saved:
            root = tmp_path_factory.mktemp(f"{family}-{variant}")
            shards = SHARD_BYTES if dtype == torch.float32 else None
            config = tiny_config(family, variant)
            saved[key] = save_tiny(config, root / "hf", dtype=dtype, max_shard_size=shards)
        return saved[key]

    return get


@pytest.fixture
def small_attention_chunks(monkeypatch):
    """Attention in chunks of 5 queries: sliding windows (8) straddle chunk boundaries."""
    monkeypatch.setattr(torch_layers, "ATTENTION_CHUNK", 5)


# ------------------------------------------------------------ the family's folder


@pytest.mark.unit
@pytest.mark.parametrize("family", FAMILIES)
def test_family_declares_tiny_models(family):
    assert _variants(family), f"models/{family}/tiny.py has no TINY table of tiny variants"
    table = tiny_module(family).TINY
    assert "base" in table, f"models/{family}/tiny.py: TINY has no 'base' variant"
    for variant in table:
        config = tiny_config(family, variant)
        assert config.architectures == [bridge_for_family(family).architectures[0]]
        assert config.num_hidden_layers <= 4 and config.hidden_size <= 64, (family, variant)


# ------------------------------------------------------------ one process


@pytest.mark.unit
@pytest.mark.parametrize("family, variant", CASES, ids=CASE_IDS)
def test_config_round_trip(family, variant):
    checks.config_round_trip(tiny_config(family, variant))


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family, variant", CASES, ids=CASE_IDS)
def test_round_trip_bit_exact(hf_dir, family, variant, dtype, tmp_path):
    source = hf_dir(family, variant, dtype)
    if dtype == torch.float32:  # the sharded source: the index and its shards come back
        shards = set(json.loads((source / checks.INDEX).read_text())["weight_map"].values())
        assert len(shards) > 1, shards
    checks.round_trip_in_process(source, tmp_path / "back")


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron", "small_attention_chunks")
@pytest.mark.parametrize("family, variant", CASES, ids=CASE_IDS)
def test_logits_match_transformers(hf_dir, family, variant):
    result = checks.logits_in_process(hf_dir(family, variant))
    assert result.max_abs_diff <= checks.ATOL_FP32


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron", "small_attention_chunks")
@pytest.mark.parametrize(
    "family, variant", [c for c in CASES if not has_experts(c[0])], ids=lambda x: x
)
def test_gradients_match_transformers(hf_dir, family, variant):
    # MoE families are left out: transformers keeps its experts fused in memory
    # (experts.gate_up_proj) while the mappings name its checkpoint's tensors.
    assert checks.gradients_in_process(hf_dir(family, variant)) <= 1e-4


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("family", FAMILIES)
def test_verify_rejects_perturbed_weights(hf_dir, family, tmp_path):
    tensor = getattr(tiny_module(family), "PERTURB_TENSOR", "layers.0.")
    diff = checks.verify_perturbed_rejected_in_process(
        hf_dir(family, "base"), tmp_path, tensor=tensor
    )
    assert diff > 1e-3


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("family", FAMILIES)
def test_model_from_scratch_exports_to_transformers(family, tmp_path):
    checks.export_from_scratch_in_process(f"{family}_tiny_pretrain_config", tmp_path / "hf")


# ------------------------------------------------------------ two processes, one launch


FAMILIES_PER_LAUNCH = 8


@pytest.fixture(scope="module")
def parallel_results(request, hf_dir, tmp_path_factory, single_process_megatron):
    """{(family, variant, check): record} and {family: the launch that ended in it}.

    A launch runs up to FAMILIES_PER_LAUNCH of the selected families: one launch for all 24
    grew slower with each family (3-5 s for the first ones, minutes for the last), so 18 of
    a 50-minute CI run went to it. A failing check ends a launch (its ranks may disagree on
    what comes next); the families after it then get another launch.
    """
    selected: dict[str, set[str]] = {}
    for item in request.session.items:
        if getattr(item, "originalname", "") == "test_parallel":
            params = item.callspec.params
            selected.setdefault(params["family"], set()).add(params["variant"])
    work = tmp_path_factory.mktemp("parallel")
    plans = [_family_plan(f, selected[f], hf_dir, work / f) for f in FAMILIES if f in selected]
    records, ended = {}, {}
    batches = [
        plans[i : i + FAMILIES_PER_LAUNCH] for i in range(0, len(plans), FAMILIES_PER_LAUNCH)
    ]
    for batch in batches:
        _launch_until_done(batch, work, records, ended)
    return records, ended


def _launch_until_done(plans: list, work: Path, records: dict, ended: dict) -> None:
    """Run ``plans`` in one launch, relaunching after the family a launch ended in."""
    while plans:
        plan_file = work / f"plan{len(list(work.glob('plan*.json')))}.json"
        plan_file.write_text(json.dumps({"families": plans}))
        launch = torchrun(2, [str(PARALLEL_CHECK), str(plan_file)], timeout=1800)
        plan_file.with_suffix(".log").write_text(launch.stdout + launch.stderr)
        started = plans[0]["family"]
        for line in launch.stdout.splitlines():
            if line.startswith("STARTED "):
                started = line.removeprefix("STARTED ")
            elif line.startswith("RESULT "):
                record = json.loads(line.removeprefix("RESULT "))
                records[record["family"], record["variant"], record["check"]] = record
        if launch.returncode == 0:
            return
        ended[started] = launch
        plans = plans[[p["family"] for p in plans].index(started) + 1 :]


def _family_plan(family: str, variants: set[str], hf_dir, work: Path) -> dict:
    """The launch's work for the selected ``variants`` of ``family``."""
    plan = {"family": family, "layouts": layouts(family), "variants": {}}
    for variant in (v for v in _variants(family) if v in variants):
        source = hf_dir(family, variant)
        for layout in plan["layouts"]:
            (work / variant / layout).mkdir(parents=True)
        tp1 = None
        if "gradients_tp2" in parallel_checks(family, variant):
            tp1 = str(checks.to_megatron_checkpoint(source, work / variant / "tp1"))
        plan["variants"][variant] = {
            "hf_dir": str(source),
            "work": str(work / variant),
            "tp1_checkpoint": tp1,
        }
    return plan


@pytest.mark.integration
@pytest.mark.parametrize("family, variant, check", PARALLEL_PARAMS)
def test_parallel(parallel_results, hf_dir, family, variant, check):
    records, ended = parallel_results
    record = records.get((family, variant, check))
    if record is None:
        launch = ended.get(family)
        detail = f"exit code {launch.returncode}:\n{launch.stderr[-3000:]}" if launch else ""
        pytest.fail(f"the launch ended in {family} before {variant} {check}; {detail}")
    assert "error" not in record, record["error"]
    assert record["max_abs_diff"] <= checks.ATOL_FP32, record
    if check == "gradients_tp2":
        assert record["max_rel_grad_diff"] <= 1e-4, record
        return
    assert record["top1_agreement"] == 1.0, record
    checks.assert_same_hf_folder(hf_dir(family, variant), Path(record["hf_dir"]))
    # what a training run's summary reports: counted over the ranks, once each
    assert record["parameters"] == checks.hf_parameter_count(hf_dir(family, variant)), record
