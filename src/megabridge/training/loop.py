"""The training loop shared by pretraining, SFT and LoRA: they differ by recipe and data."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megabridge import runtime
from megabridge.conversion.auto_bridge import AutoBridge
from megabridge.errors import CheckpointError, UserError
from megabridge.models import init as weight_init
from megabridge.models import vision
from megabridge.models.config import (
    copy_architecture,
    expert_tensor_parallel_size,
    model_config_from_dict,
)
from megabridge.models.provider import build_model, use_bf16
from megabridge.peft import lora
from megabridge.progress import Waiting
from megabridge.training import checkpointing, console, data, save_hf
from megabridge.training.config import ConfigContainer, check_pretrained, validate
from megabridge.training.flops import bf16_peak_tflops, flops_per_token
from megabridge.training.metrics import MetricsWriter
from megabridge.training.optim import (
    build_optimizer,
    build_scheduler,
    connect_to_schedules,
    wrap_ddp,
)
from megabridge.training.signals import ExitSignalHandler
from megabridge.training.step import evaluate, train_step
from megabridge.training.trackers import open_trackers

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
    saved_iteration: int | None = None  # of the newest checkpoint in save_dir, once known
    hf_writer: object = None  # checkpoint.save_hf: adds the HF copy to each checkpoint


def train(cfg: ConfigContainer) -> TrainState:
    """Run ``cfg`` to ``train.train_iters`` (or until told to stop); returns the final state.

    The signal handler is on from the start, so SIGTERM while the model is being
    built is not lost: the run stops with a checkpoint after its first iteration.
    """
    start = time.time()
    with ExitSignalHandler(enabled=cfg.train.exit_signal_handler) as signals:
        s = setup(cfg)
        trackers = open_trackers(cfg.logger, cfg.to_dict(), s.log_dir) if s.rt.is_main else []
        writer = MetricsWriter(
            s.log_dir, s.rt.is_main, tensorboard=cfg.logger.tensorboard, trackers=trackers
        )
        try:
            _loop(s, writer, signals, start)
        finally:
            writer.close()
    return s.state


def finetune(cfg: ConfigContainer) -> TrainState:
    """train() from a pretrained model (SFT or LoRA); refuses to start from random weights."""
    check_pretrained(cfg)
    return train(cfg)


def _loop(s: Session, writer: MetricsWriter, signals: ExitSignalHandler, start: float) -> None:
    cfg, state, t = s.cfg, s.state, s.cfg.train
    clock = _Clock(start=time.time(), last_log=time.time())
    bad_in_a_row = 0
    while state.iteration < t.train_iters:
        loss, grad_norm, stepped, _ = train_step(
            cfg, s.model, s.optimizer, s.scheduler, s.train_data, state.consumed_samples
        )
        state.iteration += 1
        state.consumed_samples += t.global_batch_size
        bad_in_a_row = 0 if stepped else bad_in_a_row + 1
        state.skipped_iterations += 0 if stepped else 1
        _report(s, writer, clock, loss, grad_norm)
        if bad_in_a_row:
            _skipped_step(s, loss, grad_norm, bad_in_a_row)  # raises at the limit
        if _every(cfg.checkpoint.save_interval, state.iteration):
            save(s)  # the last one too: the save after the loop sees it is done
        reason = signals.should_exit(start, t.exit_duration_in_mins)
        if reason:
            _exit_early(s, reason)
            return
    if cfg.checkpoint.save_at_end:
        save(s)


def _every(interval: int | None, iteration: int) -> bool:
    return bool(interval) and iteration % interval == 0


@dataclasses.dataclass
class _Clock:
    start: float
    last_log: float


def _report(s: Session, writer: MetricsWriter, clock: _Clock, loss: float, grad_norm: float):
    """Metrics every logger.log_interval iterations; evaluation every train.eval_interval."""
    cfg, state, t = s.cfg, s.state, s.cfg.train
    record: dict = {"iteration": state.iteration}
    if _every(cfg.logger.log_interval, state.iteration) or state.iteration == t.train_iters:
        now = time.time()
        iters = min(cfg.logger.log_interval, state.iteration) or 1
        seq = cfg.dataset.seq_length or cfg.model.seq_length
        record.update(
            loss=loss,
            lr=s.optimizer.param_groups[0]["lr"],
            grad_norm=grad_norm,
            tokens_per_s=iters * t.global_batch_size * seq / max(now - clock.last_log, 1e-9),
            consumed_samples=state.consumed_samples,
            skipped_iterations=state.skipped_iterations,
        )
        clock.last_log = now
        peak = _peak_flops(s)
        if peak:
            record["mfu"] = record["tokens_per_s"] * flops_per_token(cfg.model, seq) / peak
    if s.valid_data is not None and _every(t.eval_interval, state.iteration):
        record["eval_loss"] = evaluate(cfg, s.model, s.valid_data)
    if len(record) > 1:
        writer.write(record, t.train_iters, time.time() - clock.start)


def _peak_flops(s: Session) -> float | None:
    """The GPU's bf16 peak in FLOP/s (per process), for MFU; None on CPU or an unknown GPU."""
    if s.rt.device.type != "cuda" or not use_bf16(s.cfg.model):
        return None
    peak = bf16_peak_tflops(torch.cuda.get_device_name(s.rt.device))
    return peak * 1e12 * s.rt.world_size if peak else None


def _skipped_step(s: Session, loss: float, grad_norm: float, in_a_row: int) -> None:
    """A step skipped for a NaN/Inf loss or grad norm: warn; at the limit, stop."""
    limit = s.cfg.train.skip_nonfinite_limit
    if s.rt.is_main:
        log.warning(
            "iteration %d: non-finite loss %s / grad norm %s: update skipped (%d in a row, limit %d)",
            s.state.iteration,
            loss,
            grad_norm,
            in_a_row,
            limit,
        )
    if in_a_row >= limit:
        _stop_after_bad_steps(s, in_a_row)


def _stop_after_bad_steps(s: Session, count: int) -> None:
    """Too many non-finite steps in a row: checkpoint the last good state and stop loudly.

    Skipped steps changed neither the weights nor the optimizer, so stepping the
    counters back by ``count`` gives the state after the last good step. A
    resume from it replays the failing batches (with, say, a lower optimizer.lr).
    """
    state = s.state
    state.iteration -= count
    state.consumed_samples -= count * s.cfg.train.global_batch_size
    state.skipped_iterations -= count
    path = save(s)
    raise UserError(
        f"iterations {state.iteration + 1}-{state.iteration + count} had a non-finite loss or "
        f"gradient norm (train.skip_nonfinite_limit={s.cfg.train.skip_nonfinite_limit}); "
        f"stopped with the last good state, iteration {state.iteration}, saved in {path}"
    )


def _exit_early(s: Session, reason: str) -> None:
    path = save(s)
    if s.rt.is_main:
        log.info(
            "%s: saved iteration %d in %s; exiting (resume with checkpoint.load=%s)",
            reason,
            s.state.iteration,
            path,
            s.save_dir,
        )


def save(s: Session) -> Path:
    """Checkpoint the current state, unless this very state is the newest checkpoint already."""
    if s.saved_iteration == s.state.iteration:
        return s.save_dir / checkpointing.iter_dirname(s.state.iteration)
    with Waiting(f"saving checkpoint of iteration {s.state.iteration}", enabled=s.rt.is_main):
        path = checkpointing.save(
            s.save_dir,
            s.state.iteration,
            s.model,
            s.optimizer,
            s.scheduler,
            dataclasses.asdict(s.state),
            s.cfg.model,
            keep_last_n=s.cfg.checkpoint.keep_last_n,
            write_extra=s.hf_writer,
        )
    s.saved_iteration = s.state.iteration
    if s.rt.is_main:
        log.info("saved checkpoint %s", path)
    return path


# ------------------------------------------------------------------------ setup


def setup(cfg: ConfigContainer) -> Session:
    _adopt_pretrained_architecture(cfg)
    validate(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    rt = runtime.init_distributed(cfg.dist.distributed_timeout_minutes)
    m = cfg.model
    runtime.init_model_parallel(
        m.tensor_model_parallel_size,
        m.pipeline_model_parallel_size,
        m.expert_model_parallel_size,
        cfg.dist.distributed_timeout_minutes,
        expert_tensor_parallel_size(m),
    )
    runtime.seed_everything(cfg.rng.seed)
    save_dir, log_dir = _run_dirs(cfg, rt)
    checkpointing.ensure_writable(save_dir)
    resume_from = _resume_checkpoint(cfg, save_dir)

    model = build_model(m)
    weight_init.initialize(model, m, cfg.rng.seed)
    if cfg.checkpoint.pretrained_checkpoint and (resume_from is None or cfg.peft.method != "none"):
        _load_pretrained(cfg, model)  # a PEFT checkpoint holds only the adapters, not this base
    if m.vision is not None:  # LoRA below freezes every base weight anyway
        vision.freeze(model, m.freeze_language_model, m.freeze_vision_model,
                      m.freeze_vision_projection)  # fmt: skip
    if cfg.peft.method != "none":
        lora.apply(model, cfg)
    model = wrap_ddp(cfg, model)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    connect_to_schedules(cfg, model, optimizer)
    state, saved_iteration = TrainState(), None
    if resume_from is not None:
        saved = checkpointing.load(
            resume_from, model, optimizer, scheduler, hf_config=cfg.checkpoint.hf_config
        )
        state = TrainState(**{k: saved[k] for k in dataclasses.asdict(state) if k in saved})
        if resume_from.parent.resolve() == save_dir.resolve():
            saved_iteration = state.iteration
        if rt.is_main:
            log.info("resumed from %s at iteration %d", resume_from, state.iteration)
    train_data, valid_data = data.build(cfg)
    # collective: every rank counts its share
    params = console.parameter_counts(
        model,
        m.tensor_model_parallel_size,
        m.pipeline_model_parallel_size,
        m.expert_model_parallel_size,
        expert_tensor_parallel_size(m),
    )
    if rt.is_main:
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        log.info("starting\n%s", console.start_of_run(cfg, params, save_dir, log_dir))
    s = Session(
        cfg, rt, model, optimizer, scheduler, train_data, valid_data, state, save_dir, log_dir
    )
    s.saved_iteration = saved_iteration
    if cfg.checkpoint.save_hf:
        s.hf_writer = save_hf.writer(cfg, save_hf.bridge_for_run(cfg), model)
    return s


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
    """The checkpoint to resume from, after checking it belongs to this model.

    With checkpoint.load, its newest complete checkpoint (damaged or unfinished
    ones are skipped with a warning); a save folder that holds none yet is a
    fresh start. Without, a save folder that holds checkpoints is refused.
    """
    if cfg.checkpoint.load:
        load_root = Path(cfg.checkpoint.load)
        is_save_dir = load_root.resolve() == save_dir.resolve()
        if is_save_dir and not checkpointing.has_checkpoints(load_root):
            return None
        ckpt = checkpointing.resolve(load_root)
        checkpointing.check_architecture(ckpt, cfg.model, cfg.checkpoint.hf_config)
        return ckpt
    if checkpointing.has_checkpoints(save_dir):
        newest = max(p.name for p in save_dir.glob("iter_*"))
        raise CheckpointError(
            f"checkpoint.save={save_dir} already holds {newest}; resume with "
            f"checkpoint.load={save_dir} or choose another checkpoint.save"
        )
    return None


def _adopt_pretrained_architecture(cfg: ConfigContainer) -> None:
    """The pretrained checkpoint (HF folder or Megatron checkpoint) decides the model's shape."""
    path = cfg.checkpoint.pretrained_checkpoint
    if not path:
        return

    if (Path(path) / "config.json").is_file():
        # a text recipe reads a vision-language checkpoint's language model (Gemma 3)
        text_only = cfg.model.vision is None
        AutoBridge.from_hf_pretrained(path, text_only=text_only).apply_to_model_config(cfg.model)
    else:
        meta = checkpointing.read_metadata(checkpointing.resolve(path), cfg.checkpoint.hf_config)
        copy_architecture(model_config_from_dict(meta["model_config"]), cfg.model)


def _load_pretrained(cfg: ConfigContainer, model: list) -> None:
    path = Path(cfg.checkpoint.pretrained_checkpoint)
    if (path / "config.json").is_file():
        text_only = cfg.model.vision is None
        AutoBridge.from_hf_pretrained(path, text_only=text_only).load_hf_weights(model)
        return
    ckpt = checkpointing.resolve(path)
    checkpointing.check_architecture(ckpt, cfg.model, cfg.checkpoint.hf_config)
    checkpointing.load(ckpt, model, model_only=True, hf_config=cfg.checkpoint.hf_config)
