"""AutoBridge: the public entry point for conversion.

bridge = AutoBridge.from_hf_pretrained("meta-llama/Llama-3.2-1B")   # a local folder
provider = bridge.to_megatron_provider()        # a ModelConfig: set parallel sizes on it
provider.tensor_model_parallel_size = 2
model = bridge.to_megatron_model(provider)      # this rank's shard, weights loaded
bridge.save_hf_pretrained(model, "out/")        # bit-exact HF folder again
for name, tensor in bridge.stream_hf_weights(model): ...   # in memory, e.g. RL weight sync
bridge.sync_weights(model, consumer)            # into a transformers model / an engine
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from megabridge import catalog, checksums, outputs, runtime
from megabridge.conversion import (
    hf_io,
    quantized,
    registry,
    streaming,
    streaming_export,
    sync_plan,
    transfer,
    weight_sync,
)
from megabridge.conversion.family import FamilyBridge
from megabridge.errors import ConfigError, ConversionError, UserError
from megabridge.models.config import (
    ModelConfig,
    copy_architecture,
    expert_tensor_parallel_size,
    model_config_from_dict,
    validate_model_config,
)
from megabridge.models.provider import build_model
from megabridge.progress import Progress
from megabridge.training import checkpointing, foreign, trust

log = logging.getLogger(__name__)

HF_ASSETS = "hf_assets"  # tokenizer / generation files kept inside a converted checkpoint
_PARALLEL_FIELDS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "expert_model_parallel_size",
)


class AutoBridge:
    def __init__(
        self,
        family: type[FamilyBridge],
        model_config: ModelConfig,
        hf_config: dict,
        source: hf_io.HFCheckpoint | None = None,
        source_layout: dict | None = None,
    ):
        self.family = family
        self.model_config = model_config
        self.hf_config = hf_config
        self.source = source
        self.checkpoint_dir: Path | None = (
            None  # set when the weights live in a Megatron checkpoint
        )
        self.checkpoint_meta: dict = {}  # its megabridge.json (or what stands for it)
        self.described_by: str | Path | None = None  # the HF config describing a foreign one
        self.content_unchecked = False  # its files' checksums are yet to be checked
        # tokenizer / generation files to ship with an export
        self.sidecar_dir: Path | None = source.path if source is not None else None
        # {"weight_map": {name: file}, "dtypes": {name: dtype}} of the HF folder we came from
        self.source_layout = source_layout or (_layout_of(source) if source is not None else None)
        self.allow_non_finite = False  # see allow_non_finite_weights()

    def allow_non_finite_weights(self) -> None:
        """Convert weights holding NaN or Inf instead of refusing them (--allow-non-finite)."""
        self.allow_non_finite = True
        if self.source is not None:
            self.source.allow_non_finite = True

    # ------------------------------------------------------------ constructors

    @classmethod
    def from_hf_pretrained(cls, path: str | Path, text_only: bool = False) -> AutoBridge:
        """A bridge for a local HF model folder (config.json + safetensors).

        ``text_only``: a vision-language checkpoint whose language model a text family
        reads (Gemma 3) is read as that text-only model (the towers left out)."""
        source = hf_io.HFCheckpoint(path)
        architecture = _architecture(source.config_dict, source.path)
        family = registry.bridge_for(architecture)
        hf_config = _transformers_config(source.config_dict, source.path, family)
        # A quantized source is read dequantized (hf_io), and exports as such.
        config_dict = quantized.full_precision_config(source.config_dict)
        reader = registry.text_reader_for(architecture) if text_only or not family.VISION else None
        if reader is not None:
            family, tower = reader
            hf_config, config_dict = _read_text_tower(family, tower, hf_config, source)
        elif family.HF_RENAMES:
            source.read_renamed(family.HF_RENAMES, ())
        try:
            model_config = family.model_config(hf_config)
            validate_model_config(model_config)  # sizes must be positive and divide
        except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError) as e:
            # a value of the wrong kind that transformers let through (a string for a size)
            raise ConfigError(f"{source.path}/config.json: {type(e).__name__}: {e}") from None
        return cls(family.for_model(model_config), model_config, config_dict, source)

    @classmethod
    def from_megatron_checkpoint(
        cls, path: str | Path, hf_config: str | Path | None = None, check_content: bool = True
    ) -> AutoBridge:
        """A bridge for a Megatron checkpoint: megabridge's (its megabridge.json says which
        model) or one Megatron-LM, Megatron-Bridge or NeMo 2 wrote (the model from what it
        carries, or from ``hf_config``: an HF model folder or config.json).

        ``check_content=False`` leaves the files' checksums for later: a streamed export
        (save_hf_from_checkpoint) checks them from the bytes it reads anyway, and a load
        into a built model reads them all first, as with ``True``."""
        ckpt = checkpointing.resolve(path, content=check_content)
        described_by = hf_config
        meta = checkpointing.read_metadata(ckpt, described_by)
        model_config = model_config_from_dict(meta["model_config"])
        hf = meta.get("hf") or {}
        if hf.get("config"):
            family = registry.bridge_for(_architecture(hf["config"], ckpt))
            hf_config = hf["config"]
        else:
            family = registry.bridge_for_family(model_config.family)
            hf_config = family.hf_config_dict(model_config)
        family = family.for_model(model_config)
        bridge = cls(family, model_config, hf_config, source_layout=hf.get("layout"))
        bridge.checkpoint_dir = ckpt
        bridge.checkpoint_meta = meta
        bridge.described_by = described_by
        bridge.content_unchecked = not check_content
        assets = ckpt / HF_ASSETS
        bridge.sidecar_dir = assets if assets.is_dir() else None
        if described_by is not None and Path(described_by).is_dir():  # its tokenizer files too
            bridge.sidecar_dir = Path(described_by)
        return bridge

    def use_hf_reference(self, path: str | Path) -> None:
        """Take config.json, shard layout, dtypes and tokenizer files from a reference HF folder."""
        ref = hf_io.HFCheckpoint(path)
        self.hf_config = quantized.full_precision_config(ref.config_dict)
        self.source_layout = _layout_of(ref)
        self.sidecar_dir = ref.path

    def inputs(self) -> list[Path]:
        """The folders this bridge reads from: an output may not overlap them."""
        folders = (self.source.path if self.source else None, self.checkpoint_dir, self.sidecar_dir)
        return [Path(f) for f in folders if f is not None]

    @staticmethod
    def list_supported() -> list[dict]:
        """One entry per family: its HF architectures, parallelisms and notes."""
        return catalog.families()

    # ------------------------------------------------------------ to Megatron

    def to_megatron_provider(self) -> ModelConfig:
        """A fresh ModelConfig for this model; set parallel sizes / dtype on it, then build."""
        return copy.deepcopy(self.model_config)

    def apply_to_model_config(self, cfg: ModelConfig) -> None:
        """Copy this model's architecture into ``cfg``, keeping its parallel and runtime fields."""
        copy_architecture(self.model_config, cfg)

    def to_megatron_model(
        self, provider: ModelConfig | None = None, load_weights: bool = True, seed: int = 1234
    ):
        """Build this rank's model chunks (initialising torch.distributed if needed).

        ``seed`` seeds megatron-core's RNG tracker (dropout in tensor-parallel regions)
        when no one has yet. The caller's torch RNG states are left as they were, and
        an existing parallel state of another layout is an error, never replaced.
        """
        cfg = provider or self.to_megatron_provider()
        with _callers_rng_kept():
            ensure_parallel_state(cfg, seed)
            model = build_model(cfg)
            if load_weights:
                self.load_weights(model, cfg)
        return model

    def load_weights(self, model, cfg: ModelConfig | None = None) -> None:
        """Load weights into built chunks: from the HF folder, or this bridge's Megatron checkpoint."""
        cfg = cfg or self.model_config
        if self.source is not None:
            transfer.load_hf_weights(model, self.family, self.source, cfg)
            return

        if self.content_unchecked:
            checkpointing.verify_content(self.checkpoint_dir)
            self.content_unchecked = False
        checkpointing.load(self.checkpoint_dir, model, model_only=True, hf_config=self.described_by)

    def load_hf_weights(self, model) -> None:
        """Fill built chunks from the HF folder (their config must match this model)."""
        if self.source is None:
            raise UserError("this bridge has no HF folder to load weights from")
        from megatron.core.utils import unwrap_model

        chunks = [unwrap_model(m) for m in model]
        transfer.load_hf_weights(chunks, self.family, self.source, _chunk_config(chunks))

    def save_megatron_checkpoint(
        self,
        out: str | Path,
        provider: ModelConfig | None = None,
        overwrite: bool = False,
        progress: bool = False,
    ) -> Path:
        """Write a Megatron-Core checkpoint of the HF folder (it loads at any TP/PP). Atomic.

        In one process the tensors stream from the HF files into the checkpoint one
        at a time, with no model in memory; under a launcher every rank saves its
        shard of a built model. ``provider`` sets the dtype (default: this model's).
        """
        if self.source is None:
            raise UserError("this bridge has no HF folder to convert")
        cfg = provider or self.to_megatron_provider()
        save = functools.partial(
            checkpointing.save_model,
            out,
            model_cfg=cfg,
            extra_metadata=self.checkpoint_metadata(),
            overwrite=overwrite,
            assets=self.sidecar_dir,
            inputs=self.inputs(),
        )
        plan = self._streaming_plan(cfg)
        if plan is None:
            return save(self.to_megatron_model(cfg))
        return save(None, write=functools.partial(plan.write, progress=progress))

    def _streaming_plan(self, cfg: ModelConfig):
        ensure_parallel_state(cfg)
        if dist.get_world_size() > 1:
            return None
        try:
            return streaming.plan(self, cfg, *build_model(cfg, meta=True))
        except streaming.NotStreamable as e:
            log.info("building the model in memory to convert it (%s)", e)
            return None

    # ------------------------------------------------------------ to HF

    def export_hf_weights(
        self, model, dtype: torch.dtype | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(hf_name, tensor) for every HF tensor, whole, on every rank (a collective)."""
        chunks = _unwrapped(model)
        return transfer.export_hf_weights(
            chunks, self.family, _chunk_config(chunks), self._dtype_of(dtype)
        )

    def stream_hf_weights(
        self,
        model,
        dtype: torch.dtype | None = None,
        merge_lora: bool = True,
        dst: int | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(hf_name, whole tensor) for every HF tensor, one parameter gathered at a time.

        A collective: every rank iterates it to the end (or closes it). ``dst=None``:
        every rank yields everything; ``dst=r``: rank ``r`` alone does. LoRA/DoRA
        adapters are merged on the fly unless ``merge_lora=False`` (base weights
        only). ``dtype`` None keeps the model's. See conversion/weight_sync.py.
        """
        weight_sync.gather_pending_params(model)
        chunks = _unwrapped(model)
        cfg = _chunk_config(chunks)
        return weight_sync.stream(chunks, self.family, cfg, dtype, merge_lora, dst)

    def sync_weights(
        self,
        model,
        consumer,
        dtype: torch.dtype | None = None,
        bucket_bytes: int = weight_sync.DEFAULT_BUCKET_BYTES,
        merge_lora: bool = True,
        dst: int | None = None,
    ) -> dict:
        """Feed the model's HF weights to ``consumer.load_weights`` (None on ranks without
        one) in buckets of at most ``bucket_bytes``; every rank calls it. A failure on any
        rank raises the same ConversionError on every rank. To sync again and again, keep
        a ``sync_plan`` instead: this works one out and uses it once."""
        return self.sync_plan(model, consumer, dtype, bucket_bytes, merge_lora, dst).sync()

    def sync_plan(
        self,
        model,
        consumer,
        dtype: torch.dtype | None = None,
        bucket_bytes: int = weight_sync.DEFAULT_BUCKET_BYTES,
        merge_lora: bool = True,
        dst: int | None = None,
    ) -> sync_plan.SyncPlan:
        """sync_weights, made once and run by ``plan.sync()`` after every training step:
        names, mappings, views and destinations are worked out on the first sync and kept
        while the parameters keep their storage. See conversion/sync_plan.py."""
        chunks = _unwrapped(model)
        return sync_plan.SyncPlan(
            model, chunks, self.family, _chunk_config(chunks), consumer, dtype,
            bucket_bytes, merge_lora, dst,
        )  # fmt: skip

    def _dtype_of(self, dtype: torch.dtype | None):
        if dtype is not None:
            return lambda name: dtype
        dtypes = (self.source_layout or {}).get("dtypes")
        if dtypes:
            return lambda name: getattr(torch, dtypes[name]) if name in dtypes else None
        return None

    def hf_config_for_export(self, dtype: torch.dtype | None = None) -> dict:
        config = copy.deepcopy(self.hf_config)
        if dtype is not None:
            key = "torch_dtype" if "torch_dtype" in config else "dtype"
            config[key] = str(dtype).removeprefix("torch.")
        return config

    def save_hf_pretrained(
        self,
        model,
        out: str | Path,
        dtype: torch.dtype | None = None,
        overwrite: bool = False,
        progress: bool = False,
    ) -> Path | None:
        """Write an HF folder; every rank must call it. Atomic.

        Rank 0 writes each shard as its tensors arrive, one parameter gathered at a
        time (never the whole model on one rank). LoRA/DoRA adapters are merged in.
        """
        chunks = _unwrapped(model)
        cfg = _chunk_config(chunks)
        _agree_on_rank0(lambda: outputs.check_output(out, overwrite, self.inputs()))
        tensors = transfer.export_hf_weights(
            chunks, self.family, cfg, self._dtype_of(dtype),
            params=weight_sync.sync_params(chunks, cfg), dst=0,
        )  # fmt: skip
        error = None
        with tensors:  # a failure on rank 0 still runs the collectives the others wait on
            if dist.get_rank() == 0:
                try:
                    self._write_hf(tensors, out, dtype, overwrite, progress)
                except Exception as e:  # noqa: BLE001 - raised below, on every rank
                    error = e
        _agree_on_rank0(lambda: _reraise(error))
        return Path(out) if dist.get_rank() == 0 else None

    def _write_hf(self, tensors, out, dtype, overwrite: bool, progress: bool) -> None:
        layout = (self.source_layout or {}).get("weight_map") if dtype is None else None
        if progress:
            tensors = _progress(tensors, total=len(layout) if layout else None, desc="export")
        with outputs.output_folder(out, overwrite, self.inputs()) as tmp:
            hf_io.write_hf_folder(
                tmp, tensors, self.hf_config_for_export(dtype), self.sidecar_dir, layout,
                allow_non_finite=self.allow_non_finite,
            )  # fmt: skip

    def save_hf_from_checkpoint(
        self,
        out: str | Path,
        dtype: torch.dtype | None = None,
        overwrite: bool = False,
        progress: bool = False,
    ) -> Path | None:
        """Write this bridge's Megatron checkpoint as an HF folder, streamed tensor by tensor
        (no model in memory). Atomic. Returns None, writing nothing, when the checkpoint
        cannot be streamed (several processes, a PEFT checkpoint, an unusual layout):
        then build the model and use save_hf_pretrained."""
        meta = self.checkpoint_meta
        if self.checkpoint_dir is None or "peft" in meta:
            return None
        cfg = self.to_megatron_provider()
        for field in _PARALLEL_FIELDS:
            setattr(cfg, field, 1)
        ensure_parallel_state(cfg)
        if dist.get_world_size() > 1:
            return None
        weights = foreign.dist_dir(self.checkpoint_dir)
        verifier = None  # checks the checksums from the bytes the export reads
        if self.content_unchecked and "checksums" in meta:
            verifier = checksums.ReadVerifier(self.checkpoint_dir, meta["checksums"])
        with _damage_first(verifier):
            trust.check_pickles(weights)  # before torch unpickles anything of it
            try:
                export = streaming_export.plan(
                    self.family, cfg, *build_model(cfg, meta=True), weights,
                    prefix=meta.get("foreign", {}).get("key_prefix", ""),
                    vocab=self.hf_config.get("vocab_size"), dtype_of=self._dtype_of(dtype),
                    verifier=verifier,
                )  # fmt: skip
            except streaming.NotStreamable as e:
                log.info("building the model in memory to export it (%s)", e)
                return None  # load_weights then checks the content before reading it
            layout = (self.source_layout or {}).get("weight_map") if dtype is None else None
            finish = verifier.check if verifier is not None else None
            bar = functools.partial(_counted, export=export, desc="export", finish=finish)
            with outputs.output_folder(out, overwrite, self.inputs()) as tmp:
                streaming_export.write_hf_folder(
                    export, tmp, self.hf_config_for_export(dtype), self.sidecar_dir, layout,
                    progress=bar if progress else iter, allow_non_finite=self.allow_non_finite,
                )  # fmt: skip
                if verifier is not None:  # before the output is renamed into place
                    verifier.check()
        self.content_unchecked = False
        return Path(out)

    def checkpoint_metadata(self) -> dict:
        """What megabridge.json keeps so that the checkpoint can go back to HF unchanged."""
        return {"hf": {"config": self.hf_config, "layout": self.source_layout}}


# ------------------------------------------------------------ helpers


def _agree_on_rank0(check) -> None:
    """Run ``check`` on rank 0; if it raises, every rank raises (rank 0 its own error,
    the others a UserError, or ConversionError for another failure, with its message)."""
    box = [None]
    if dist.get_rank() == 0:
        try:
            check()
        except Exception as e:
            box = [(isinstance(e, UserError), f"{e}")]
            if dist.get_world_size() > 1:
                dist.broadcast_object_list(box, src=0)
            raise
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0]:
        user, message = box[0]
        raise (UserError if user else ConversionError)(f"rank 0: {message}")


@contextlib.contextmanager
def _damage_first(verifier: checksums.ReadVerifier | None) -> Iterator[None]:
    """A read that fails on a checkpoint whose bytes differ from their checksums fails as
    that damage: a flipped byte can surface first as a NaN or a malformed chunk."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        yield
    except (Exception, CheckpointException):
        if verifier is not None:
            verifier.check()
        raise


def _reraise(error: BaseException | None) -> None:
    if error is not None:
        raise error


def _layout_of(source: hf_io.HFCheckpoint) -> dict:
    return {
        "weight_map": source.files_by_name(),
        "dtypes": {n: str(source.dtype(n)).removeprefix("torch.") for n in source.keys()},
    }


def _progress(tensors, total, desc):
    with Progress(desc, total=total) as bar:
        for name, tensor in tensors:
            yield name, tensor
            bar.update(nbytes=tensor.numel() * tensor.element_size())


def _counted(params, export, desc, finish=None):
    """Progress over the streamed export's parameters (each read, mapped and written);
    ``finish`` runs after the last one, before the summary line (an error prints alone)."""
    with Progress(desc, total=len(export.params)) as bar:
        for p in params:
            yield p
            bar.update(nbytes=math.prod(p.shape) * export.stored_dtype[p.name].itemsize)
        if finish is not None:
            finish()


def _architecture(config_dict: dict, where) -> str:
    archs = config_dict.get("architectures") or []
    if not archs:
        raise UserError(f"{where}/config.json names no architectures")
    if not isinstance(archs, list) or not isinstance(archs[0], str):
        raise UserError(f"{where}/config.json: architectures must be a list of class names")
    return archs[0]


def _read_text_tower(family, tower, hf_config, source: hf_io.HFCheckpoint):
    """The language model of a multimodal checkpoint: its transformers config, and the
    config.json of the text-only model it exports as; ``source`` then reads its tensors
    under the text-only names and leaves the other towers' out."""
    text_config = getattr(hf_config, tower.config_key)
    left_out = source.read_renamed(tower.renames, tower.ignored)
    log.warning(
        "%s: reading the language model only (%d tensors of other towers left out); "
        "it exports as a text-only %s",
        tower.architecture,
        len(left_out),
        family.architectures[0],
    )
    config_dict = text_config.to_dict()
    config_dict.update(architectures=[family.architectures[0]], model_type=family.hf_model_type)
    for key in ("dtype", "torch_dtype"):  # the checkpoint's dtype is written at the top level
        if key in source.config_dict:
            config_dict[key] = source.config_dict[key]
    return text_config, config_dict


def _transformers_config(config_dict: dict, path: Path, family: type[FamilyBridge]):
    from transformers import AutoConfig

    try:
        if config_dict.get("model_type") in family.HF_MODEL_TYPE_ALIASES:
            # A release of the family's architecture under its own model_type (Kimi-K2's
            # "kimi_k2"), which transformers does not know: read as the family's config.
            fields = {k: v for k, v in config_dict.items() if k not in ("model_type", "auto_map")}
            return AutoConfig.for_model(family.hf_model_type, **fields)
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means transformers cannot read it
        # its messages run to several lines (an unknown model_type adds install advice)
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise UserError(f"transformers cannot read {path}/config.json: {first}") from None


def _unwrapped(model) -> list:
    from megatron.core.utils import unwrap_model

    return [unwrap_model(m) for m in model]


def _chunk_config(chunks) -> ModelConfig:
    cfg = getattr(chunks[0], "megabridge_config", None)
    if cfg is None:
        raise UserError("this model was not built by megabridge (no model config attached)")
    return cfg


def ensure_parallel_state(cfg: ModelConfig, seed: int = 1234) -> None:
    """Set up torch.distributed and Megatron's parallel state for ``cfg``'s layout, if missing.

    An existing parallel state must have that layout: rebuilding it would pull the
    process groups from under whatever the caller built with them.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    validate_model_config(cfg)  # sizes and layout, before anything is built from them
    runtime.init_distributed()
    wanted = tuple(getattr(cfg, f) for f in _PARALLEL_FIELDS)
    expert_tp = expert_tensor_parallel_size(cfg)
    if ps.model_parallel_is_initialized():
        existing = (
            ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size(),
            ps.get_expert_model_parallel_world_size(),
        )
        if existing == wanted and ps.get_expert_tensor_parallel_world_size() != expert_tp:
            raise ConfigError(
                f"Megatron's parallel state splits experts over "
                f"{ps.get_expert_tensor_parallel_world_size()} ranks; this model needs "
                f"{expert_tp}: build it in a fresh process"
            )
        if existing != wanted:
            raise ConfigError(
                f"Megatron's parallel state is already set up for {_layout(existing)}; this "
                f"model asks for {_layout(wanted)}: build it with that layout or in a fresh process"
            )
    else:
        runtime.init_model_parallel(*wanted, expert_tensor_parallel_size=expert_tp)
    if not tensor_parallel.get_cuda_rng_tracker().get_states():
        # megatron-core seeds the tracker through the default CUDA generator (on the CPU
        # backend: the CPU one), which is the caller's.
        with _callers_rng_kept():
            tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _layout(sizes: tuple[int, int, int]) -> str:
    return "TP={}, PP={}, EP={}".format(*sizes)


def _callers_rng_kept():
    """Restore torch's CPU (and this GPU's) RNG state on exit."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)
