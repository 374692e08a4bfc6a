"""The training loop shared by pretraining, SFT and LoRA: they differ by recipe and data."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import torch.distributed as dist

from megabridge import runtime
from megabridge.errors import CheckpointError
from megabridge.training import checkpointing
from megabridge.training.config import ConfigContainer
from megabridge.training.metrics import MetricsWriter
from megabridge.training.signals import ExitSignalHandler

log = logging.getLogger("megabridge.train")


@dataclasses.dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0


@dataclasses.dataclass
class Session:
    """Everything a run holds once it is set up."""

    cfg: ConfigContainer
    rt: runtime.Runtime
    model: list
    optimizer: object
    scheduler: object
    train_data: object
    valid_data: object | None
    state: TrainState
    save_dir: Path
    log_dir: Path


def train(cfg: ConfigContainer) -> TrainState:
    """Run ``cfg`` to ``train.train_iters`` (or until told to stop); returns the final state."""
    s = setup(cfg)
    writer = MetricsWriter(s.log_dir, enabled=s.rt.is_main, tensorboard=cfg.logger.tensorboard)
    try:
        with ExitSignalHandler(enabled=cfg.train.exit_signal_handler) as signals:
            _loop(s, writer, signals)
    finally:
        writer.close()
    return s.state


def _loop(s: Session, writer: MetricsWriter, signals: ExitSignalHandler) -> None:
    from megabridge.training.step import evaluate, train_step

    cfg, state, t = s.cfg, s.state, s.cfg.train
    seq = cfg.dataset.seq_length or cfg.model.seq_length
    start = time.time()
    last_log, consecutive_bad = time.time(), 0
    while state.iteration < t.train_iters:
        loss, grad_norm, stepped, tokens = train_step(
            cfg, s.model, s.optimizer, s.scheduler, s.train_data, state.consumed_samples
        )
        state.iteration += 1
        state.consumed_samples += t.global_batch_size
        if stepped:
            consecutive_bad = 0
        else:
            state.skipped_iterations += 1
            consecutive_bad += 1
            if s.rt.is_main:
                log.warning(
                    "iteration %d: non-finite loss %s / grad norm %s: update skipped (%d in a row)",
                    state.iteration,
                    loss,
                    grad_norm,
                    consecutive_bad,
                )
            if consecutive_bad >= t.skip_nonfinite_limit:
                _stop_after_bad_steps(s, consecutive_bad)
                return
        if state.iteration % cfg.logger.log_interval == 0 or state.iteration == t.train_iters:
            now = time.time()
            iters = min(cfg.logger.log_interval, state.iteration) or 1
            record = {
                "iteration": state.iteration,
                "loss": loss,
                "lr": s.optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm,
                "tokens_per_s": iters * t.global_batch_size * seq / max(now - last_log, 1e-9),
                "consumed_samples": state.consumed_samples,
                "skipped_iterations": state.skipped_iterations,
            }
            last_log = now
            if (
                t.eval_interval
                and s.valid_data is not None
                and state.iteration % t.eval_interval == 0
            ):
                record["eval_loss"] = evaluate(cfg, s.model, s.valid_data)
            writer.write(record, t.train_iters, now - start)
        elif (
            t.eval_interval and s.valid_data is not None and state.iteration % t.eval_interval == 0
        ):
            writer.write(
                {"iteration": state.iteration, "eval_loss": evaluate(cfg, s.model, s.valid_data)},
                t.train_iters,
                time.time() - start,
            )
        interval = cfg.checkpoint.save_interval
        if interval and state.iteration % interval == 0 and state.iteration < t.train_iters:
            save(s)
        reason = signals.should_exit(start, t.exit_duration_in_mins)
        if reason:
            path = save(s)
            if s.rt.is_main:
                log.info("%s: saved %s at iteration %d; exiting", reason, path, state.iteration)
            return
    save(s)


def _stop_after_bad_steps(s: Session, count: int) -> None:
    """Too many non-finite steps: keep the last good checkpoint and stop loudly."""
    from megabridge.errors import UserError

    # The weights were never updated by a bad step, so they are the last good state.
    path = save(s)
    raise UserError(
        f"{count} consecutive iterations had a non-finite loss or gradient norm "
        f"(limit train.skip_nonfinite_limit={s.cfg.train.skip_nonfinite_limit}); "
        f"the last good state is saved in {path}"
    )


def save(s: Session) -> Path:
    path = checkpointing.save(
        s.save_dir,
        s.state.iteration,
        s.model,
        s.optimizer,
        s.scheduler,
        dataclasses.asdict(s.state),
        s.cfg.model,
        keep_last_n=s.cfg.checkpoint.keep_last_n,
    )
    if s.rt.is_main:
        log.info("saved checkpoint %s", path)
    return path


# ------------------------------------------------------------------------ setup


def setup(cfg: ConfigContainer) -> Session:
    from megabridge.models import init as weight_init
    from megabridge.models.provider import build_model
    from megabridge.training import data
    from megabridge.training.config import validate
    from megabridge.training.optim import (
        build_optimizer,
        build_scheduler,
        connect_to_schedules,
        wrap_ddp,
    )

    _adopt_pretrained_architecture(cfg)
    validate(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    rt = runtime.init_distributed(cfg.dist.distributed_timeout_minutes)
    m = cfg.model
    runtime.init_model_parallel(
        m.tensor_model_parallel_size,
        m.pipeline_model_parallel_size,
        m.expert_model_parallel_size,
        cfg.dist.distributed_timeout_minutes,
    )
    runtime.seed_everything(cfg.rng.seed)
    save_dir, log_dir = _run_dirs(cfg, rt)
    resume_from = _resume_checkpoint(cfg, save_dir)

    model = build_model(m)
    weight_init.initialize(model, m, cfg.rng.seed)
    if cfg.checkpoint.pretrained_checkpoint and (resume_from is None or cfg.peft.method != "none"):
        _load_pretrained(cfg, model)  # a PEFT checkpoint holds only the adapters, not this base
    if cfg.peft.method != "none":
        from megabridge.peft import lora

        lora.apply(model, cfg)
    model = wrap_ddp(cfg, model)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    connect_to_schedules(cfg, model, optimizer)
    state = TrainState()
    if resume_from is not None:
        saved = checkpointing.load(resume_from, model, optimizer, scheduler)
        state = TrainState(**{k: saved[k] for k in dataclasses.asdict(state) if k in saved})
        if rt.is_main:
            log.info("resumed from %s at iteration %d", resume_from, state.iteration)
    train_data, valid_data = data.build(cfg)
    if rt.is_main:
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        log.info("config: %s", json.dumps(cfg.to_dict(), sort_keys=True))
        log.info("checkpoints -> %s | logs -> %s", save_dir, log_dir)
    return Session(
        cfg, rt, model, optimizer, scheduler, train_data, valid_data, state, save_dir, log_dir
    )


def _run_dirs(cfg: ConfigContainer, rt: runtime.Runtime) -> tuple[Path, Path]:
    """checkpoint.save and logger.log_dir, with a fresh per-run folder as default."""
    stamp = [time.strftime("%Y%m%d-%H%M%S")]
    dist.broadcast_object_list(stamp, src=0)  # every rank names the same folder
    run_dir = Path(cfg.checkpoint.run_dir) / f"{cfg.name}-{stamp[0]}"
    save_dir = Path(cfg.checkpoint.save) if cfg.checkpoint.save else run_dir / "checkpoints"
    log_dir = Path(cfg.logger.log_dir) if cfg.logger.log_dir else save_dir.parent / "logs"
    if not cfg.checkpoint.save:
        cfg.checkpoint.save = str(save_dir)
    if not cfg.logger.log_dir:
        cfg.logger.log_dir = str(log_dir)
    return save_dir, log_dir


def _resume_checkpoint(cfg: ConfigContainer, save_dir: Path) -> Path | None:
    """The checkpoint to resume from, after checking it belongs to this model."""
    if cfg.checkpoint.load:
        load_root = Path(cfg.checkpoint.load)
        ckpt = checkpointing.latest(load_root)
        if ckpt is None:
            if load_root.resolve() == save_dir.resolve():
                return None  # auto-resume into an empty save folder: a fresh start
            raise CheckpointError(f"checkpoint.load={load_root}: no complete checkpoint there")
        checkpointing.check_architecture(ckpt, cfg.model)
        return ckpt
    existing = checkpointing.latest(save_dir)
    if existing is not None:
        raise CheckpointError(
            f"checkpoint.save={save_dir} already holds {existing.name}; resume with "
            f"checkpoint.load={save_dir} or choose another checkpoint.save"
        )
    return None


def _adopt_pretrained_architecture(cfg: ConfigContainer) -> None:
    """The pretrained checkpoint (HF folder or Megatron checkpoint) decides the model's shape."""
    path = cfg.checkpoint.pretrained_checkpoint
    if not path:
        return
    from megabridge.conversion.auto_bridge import AutoBridge, copy_architecture

    if (Path(path) / "config.json").is_file():
        AutoBridge.from_hf_pretrained(path).apply_to_model_config(cfg.model)
    else:
        meta = checkpointing.read_metadata(checkpointing.resolve(path))
        copy_architecture(checkpointing.model_config_from_dict(meta["model_config"]), cfg.model)


def _load_pretrained(cfg: ConfigContainer, model: list) -> None:
    path = Path(cfg.checkpoint.pretrained_checkpoint)
    if (path / "config.json").is_file():
        from megabridge.conversion.auto_bridge import AutoBridge

        AutoBridge.from_hf_pretrained(path).load_hf_weights(model)
        return
    ckpt = checkpointing.resolve(path)
    checkpointing.check_architecture(ckpt, cfg.model)
    checkpointing.load(ckpt, model, model_only=True)
