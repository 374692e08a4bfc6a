"""W&B (offline) and MLflow (SQLite) get the scalars of metrics.jsonl and the resolved config.

One short training run logs to both; each is read back through its own library: MLflow
through MlflowClient, W&B through its transaction-log records (wandb's own protobuf
classes; W&B ships no reader of offline runs in Python, so the framing is read here).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from megabridge.errors import ConfigError
from megabridge.training import trackers
from megabridge.training.config import LoggerConfig
from megabridge.training.metrics import MetricsWriter
from tests.helpers import read_metrics, train

RECIPE = "vanilla_gpt_pretrain_config"
SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s")


def wandb_records(run_file: Path) -> list:
    """The Record protos of a .wandb file: a 7-byte W&B header, then LevelDB-log framing
    (32 KiB blocks; each chunk: crc32c (4), length (2), type (1: full, 2-4: first/middle/last))."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history_and_config(run_file: Path) -> tuple[dict[int, dict], dict]:
    history, config = {}, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                   for item in record.history.item}  # fmt: skip
            history[row.pop("_step")] = row
        elif kind in ("run", "config"):  # the config given to wandb.init rides on the run record
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({i.key: json.loads(i.value_json) for i in updates})
    return history, config


@pytest.mark.integration
def test_wandb_and_mlflow_log_what_metrics_jsonl_logs(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train(1, RECIPE, [
        "train.train_iters=3", "train.global_batch_size=4", "train.micro_batch_size=4",
        "scheduler.lr_warmup_iters=1", f"checkpoint.run_dir={tmp_path / 'runs'}",
        "checkpoint.save_interval=None", f"logger.log_dir={tmp_path / 'logs'}",
        "logger.wandb_project=megabridge-test", "logger.wandb_mode=offline",
        "logger.wandb_exp_name=quick", f"logger.mlflow_tracking_uri={uri}",
        "logger.mlflow_experiment=quick-test", "logger.mlflow_run_name=quick",
    ], timeout=900)  # fmt: skip
    expected = {r["iteration"]: r for r in read_metrics(tmp_path / "logs") if "loss" in r}
    assert sorted(expected) == [1, 2, 3]

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("quick-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "quick" and run.info.status == "FINISHED"
    for key in SCALARS:
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert logged == pytest.approx({i: r[key] for i, r in expected.items()}), key
    assert run.data.params["train.train_iters"] == "3"
    assert run.data.params["logger.mlflow_run_name"] == "quick"

    (run_file,) = (tmp_path / "logs").glob("wandb/offline-run-*/run-*.wandb")
    history, config = wandb_history_and_config(run_file)
    assert sorted(history) == [1, 2, 3]
    for i, r in expected.items():
        for key in SCALARS:
            assert history[i][key] == pytest.approx(r[key]), (i, key)
    assert config["train"]["train_iters"] == 3
    assert config["logger"]["wandb_exp_name"] == "quick"


@pytest.mark.unit
def test_a_missing_tracker_package_is_one_line_naming_the_extra(monkeypatch):
    import importlib

    real = importlib.import_module

    def without_wandb(name, *args):
        if name == "wandb":
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_wandb)
    with pytest.raises(ConfigError, match=r"logger.wandb_project needs .*megabridge\[wandb\]"):
        trackers.open_trackers(LoggerConfig(wandb_project="p"), {}, Path("."))


@pytest.mark.unit
def test_a_failing_tracker_is_dropped_and_training_logs_on(tmp_path, caplog):
    class Flaky:
        def __init__(self):
            self.calls = 0

        def log(self, record, step):
            self.calls += 1
            raise ConnectionError("server went away")

        def close(self):
            pass

    flaky = Flaky()
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False, trackers=[flaky])
    for it in (1, 2):
        writer.write({"iteration": it, "loss": 1.0}, 2, 0.1)
    writer.close()
    assert flaky.calls == 1
    assert "server went away" in caplog.text
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [1, 2]


@pytest.mark.unit
def test_flatten_and_scalars():
    assert trackers.flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": None}) == {
        "a.b": 1, "a.c.d": "x", "e": None,
    }  # fmt: skip
    assert trackers.scalars({"iteration": 3, "loss": 2, "ok": True, "name": "x"}) == {"loss": 2.0}
