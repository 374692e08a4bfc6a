"""Experiment trackers: the scalars of metrics.jsonl, and the resolved config, in W&B or MLflow.

Both are optional extras (``pip install 'megabridge[wandb]'`` / ``'megabridge[mlflow]'``),
imported only when the run asks for them. Only rank 0 opens a tracker. Each gets the same
record that metrics.jsonl gets, at the same iteration, so the three never disagree.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from megabridge.errors import ConfigError

log = logging.getLogger("megabridge.train")

MLFLOW_BATCH = 100  # MLflow's log_batch takes at most 100 params per call


class Tracker(Protocol):
    def log(self, record: dict, step: int) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers, without the iteration (that is the step)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "iteration" and isinstance(v, int | float) and not isinstance(v, bool)
    }


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """{"train": {"train_iters": 5}} -> {"train.train_iters": 5}."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _import(module: str, option: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"{option} needs the {extra} package: pip install 'megabridge[{extra}]'"
        ) from None


class WandbTracker:
    """One W&B run; WANDB_MODE=offline (or logger.wandb_mode) keeps it on this machine."""

    def __init__(self, logger_cfg, config: dict, log_dir: Path):
        wandb = _import("wandb", "logger.wandb_project", "wandb")
        save_dir = Path(logger_cfg.wandb_save_dir or log_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=logger_cfg.wandb_project,
            entity=logger_cfg.wandb_entity,
            name=logger_cfg.wandb_exp_name,
            dir=str(save_dir),
            mode=logger_cfg.wandb_mode,
            config=config,
        )

    def log(self, record: dict, step: int) -> None:
        self._run.log(scalars(record), step=step)

    def close(self) -> None:
        self._run.finish()


class MlflowTracker:
    """One MLflow run through MlflowClient (no process-wide active run is set)."""

    def __init__(self, logger_cfg, config: dict, log_dir: Path):
        _import("mlflow", "logger.mlflow_tracking_uri", "mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = logger_cfg.mlflow_tracking_uri
        self._client = MlflowClient(tracking_uri=uri)
        name = logger_cfg.mlflow_experiment
        experiment = self._client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            # A local store would put artifacts under the current folder; keep them with the logs.
            local = urlparse(uri).scheme in ("", "file", "sqlite")
            artifacts = (log_dir / "mlflow_artifacts").resolve().as_uri() if local else None
            experiment_id = self._client.create_experiment(name, artifact_location=artifacts)
        run = self._client.create_run(experiment_id, run_name=logger_cfg.mlflow_run_name)
        self._run_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in flatten(config).items()]
        for i in range(0, len(params), MLFLOW_BATCH):
            self._client.log_batch(self._run_id, params=params[i : i + MLFLOW_BATCH])
        self._client.log_dict(self._run_id, config, "config.json")

    def log(self, record: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalars(record).items()]
        self._client.log_batch(self._run_id, metrics=metrics)

    def close(self) -> None:
        self._client.set_terminated(self._run_id)


def open_trackers(logger_cfg, config: dict, log_dir: Path) -> list[Tracker]:
    """The trackers the run's logger section asks for (none by default)."""
    trackers: list[Tracker] = []
    if logger_cfg.wandb_project:
        trackers.append(WandbTracker(logger_cfg, config, log_dir))
        log.info("W&B: project %s (%s)", logger_cfg.wandb_project, logger_cfg.wandb_mode)
    if logger_cfg.mlflow_tracking_uri:
        trackers.append(MlflowTracker(logger_cfg, config, log_dir))
        log.info("MLflow: %s, experiment %s", logger_cfg.mlflow_tracking_uri,
                 logger_cfg.mlflow_experiment)  # fmt: skip
    return trackers
