"""The training loop end to end, in fresh processes on the CPU (gloo)."""

import pytest

from tests.helpers import losses, megabridge, read_metrics, train

pytestmark = pytest.mark.integration

RECIPE = "vanilla_gpt_pretrain_config"
QUICK = [
    "train.train_iters=5",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "scheduler.lr_warmup_iters=1",
    "scheduler.lr_decay_iters=5",
    "logger.log_interval=1",
]
# Llama-shaped: RMSNorm, SwiGLU (the gated fc1 split), GQA, RoPE, untied output.
LLAMA_LIKE = [
    "model.normalization=RMSNorm",
    "model.activation=swiglu",
    "model.num_query_groups=2",
    "model.position_embedding_type=rope",
    "model.add_bias_linear=false",
    "model.share_embeddings_and_output_weights=false",
]


def test_quick_run_trains_logs_and_checkpoints(tmp_path):
    result = train(1, RECIPE, [*QUICK, f"checkpoint.run_dir={tmp_path}"])
    (run,) = list(tmp_path.iterdir())
    records = read_metrics(run / "logs")
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]
    for r in records:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
            assert key in r and r[key] == r[key] and abs(r[key]) < float("inf"), (key, r)
    assert (run / "checkpoints" / "iter_0000005" / "megabridge.json").is_file()
    assert (run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "5"
    assert list((run / "logs").glob("events.out.tfevents.*")), "TensorBoard events"
    assert "iteration 5/5" in result.stdout


# no checkpoint at all (nothing here resumes): checkpoint.save_at_end=false checked too
NO_SAVES = [*QUICK, "train.train_iters=4", *LLAMA_LIKE, "checkpoint.save_interval=None",
            "checkpoint.save_at_end=false"]  # fmt: skip


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    """NO_SAVES in one process: the reference of both parallel layouts (logs in ref/)."""
    run = tmp_path_factory.mktemp("single_process")
    train(1, RECIPE, [*NO_SAVES, f"logger.log_dir={run / 'ref'}", f"checkpoint.save={run / 'c1'}"])
    return run


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_parallel_losses_equal_single_process(single_process_run, tmp_path, layout):
    option = {
        "tp2": "model.tensor_model_parallel_size=2",
        "pp2": "model.pipeline_model_parallel_size=2",
    }
    train(
        2,
        RECIPE,
        [
            *NO_SAVES,
            option[layout],
            f"logger.log_dir={tmp_path / layout}",
            f"checkpoint.save={tmp_path / 'c2'}",
        ],
    )
    ref, got = losses(single_process_run / "ref"), losses(tmp_path / layout)
    assert sorted(ref) == sorted(got) == [1, 2, 3, 4]
    for it in ref:
        assert got[it] == pytest.approx(ref[it], rel=1e-4), (it, ref, got)
    assert ref[4] < ref[1]
    for save in (single_process_run / "c1", tmp_path / "c2"):
        assert not list(save.glob("*iter_*")), save


RESUMED = [*QUICK, "train.train_iters=4", "scheduler.lr_decay_iters=4", *LLAMA_LIKE]


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    """RESUMED at TP=2, saved every 2 iterations (tp2_ckpt/), logs in tp2/."""
    run = tmp_path_factory.mktemp("tp2_run")
    train(2, RECIPE, [
        *RESUMED, "model.tensor_model_parallel_size=2", "checkpoint.save_interval=2",
        f"logger.log_dir={run / 'tp2'}", f"checkpoint.save={run / 'tp2_ckpt'}",
    ])  # fmt: skip
    return run


@pytest.mark.parametrize("layout", ["tp1", "pp2"])
def test_a_tp2_checkpoint_resumes_at_another_layout(tp2_run, tmp_path, layout):
    """dist_checkpointing stores each tensor with its place in the whole one, so a run saved
    at TP=2 (model, optimizer, RNG, data position) continues at TP=1 or PP=2 unchanged."""
    nproc, option = {"tp1": (1, []), "pp2": (2, ["model.pipeline_model_parallel_size=2"])}[layout]
    resumed = train(nproc, RECIPE, [
        *RESUMED, *option, f"checkpoint.load={tp2_run / 'tp2_ckpt' / 'iter_0000002'}",
        f"logger.log_dir={tmp_path / layout}", f"checkpoint.save={tmp_path / (layout + '_ckpt')}",
    ])  # fmt: skip
    ref, got = losses(tp2_run / "tp2"), losses(tmp_path / layout)
    assert sorted(got) == [3, 4], resumed.stdout[-2000:]
    for it in got:
        assert got[it] == pytest.approx(ref[it], rel=1e-4), (it, ref, got)


def test_resume_matches_uninterrupted_run(tmp_path):
    common = [*QUICK, "scheduler.lr_decay_iters=10", "checkpoint.save_interval=5"]
    train(
        1,
        RECIPE,
        [
            *common,
            "train.train_iters=10",
            f"checkpoint.save={tmp_path / 'full'}",
            f"logger.log_dir={tmp_path / 'full_logs'}",
        ],
    )
    train(
        1,
        RECIPE,
        [
            *common,
            "train.train_iters=5",
            f"checkpoint.save={tmp_path / 'part'}",
            f"logger.log_dir={tmp_path / 'part_logs'}",
        ],
    )
    resumed = train(
        1,
        RECIPE,
        [
            *common,
            "train.train_iters=10",
            f"checkpoint.save={tmp_path / 'part'}",
            f"checkpoint.load={tmp_path / 'part'}",
            f"logger.log_dir={tmp_path / 'resumed_logs'}",
        ],
    )
    full, again = losses(tmp_path / "full_logs"), losses(tmp_path / "resumed_logs")
    assert sorted(again) == [6, 7, 8, 9, 10], "the resumed run logs only iterations 6-10"
    for it in again:
        assert again[it] == pytest.approx(full[it], abs=1e-5), (it, full, again)
    assert "iteration 1/" not in resumed.stdout


@pytest.fixture(scope="module")
def one_iteration_save(tmp_path_factory):
    """A save folder holding one iteration of the quick run: what the refusals below meet."""
    save = tmp_path_factory.mktemp("one_iteration") / "ckpt"
    train(1, RECIPE, [*QUICK, "train.train_iters=1", f"checkpoint.save={save}"])
    return save


def test_stale_checkpoint_is_refused_with_one_line(one_iteration_save, tmp_path):
    result = megabridge(
        [
            "train",
            "--recipe",
            RECIPE,
            *QUICK,
            "model.hidden_size=64",
            f"checkpoint.save={tmp_path / 'new'}",
            f"checkpoint.load={one_iteration_save}",
        ]
    )
    assert result.returncode == 2
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "hidden_size: checkpoint 128 vs config 64" in err[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_save_folder_with_checkpoints_is_not_overwritten(one_iteration_save):
    result = megabridge(
        ["train", "--recipe", RECIPE, *QUICK, f"checkpoint.save={one_iteration_save}"]
    )
    assert result.returncode == 2 and "already holds iter_0000001" in result.stderr
    assert sorted(p.name for p in one_iteration_save.glob("iter_*")) == ["iter_0000001"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.train_itres=5", "did you mean train.train_iters"),
        ("train.train_iters=five", "train.train_iters='five': expected int"),
        ("model.tensor_model_parallel_size=3", "not divisible"),
    ],
)
def test_bad_overrides_exit_2_with_one_line(override, message):
    result = megabridge(["train", "--recipe", RECIPE, override])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
