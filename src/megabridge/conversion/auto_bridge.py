"""AutoBridge: the public entry point for conversion.

bridge = AutoBridge.from_hf_pretrained("meta-llama/Llama-3.2-1B")   # a local folder
provider = bridge.to_megatron_provider()        # a ModelConfig: set parallel sizes on it
provider.tensor_model_parallel_size = 2
model = bridge.to_megatron_model(provider)      # this rank's shard, weights loaded
bridge.save_hf_pretrained(model, "out/")        # bit-exact HF folder again
for name, tensor in bridge.export_hf_weights(model): ...   # in memory, e.g. RL weight sync
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from megabridge import runtime
from megabridge.conversion import hf_io, registry, streaming, transfer
from megabridge.conversion.family import FamilyBridge
from megabridge.errors import ConfigError, UserError
from megabridge.models.config import (
    ModelConfig,
    copy_architecture,
    expert_tensor_parallel_size,
    model_config_from_dict,
)
from megabridge.models.provider import build_model
from megabridge.training import checkpointing

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
        # tokenizer / generation files to ship with an export
        self.sidecar_dir: Path | None = source.path if source is not None else None
        # {"weight_map": {name: file}, "dtypes": {name: dtype}} of the HF folder we came from
        self.source_layout = source_layout or (_layout_of(source) if source is not None else None)

    # ------------------------------------------------------------ constructors

    @classmethod
    def from_hf_pretrained(cls, path: str | Path) -> AutoBridge:
        """A bridge for a local HF model folder (config.json + safetensors)."""
        source = hf_io.HFCheckpoint(path)
        hf_config = _transformers_config(source.config_dict, source.path)
        family = registry.bridge_for(_architecture(source.config_dict, source.path))
        return cls(family, family.model_config(hf_config), source.config_dict, source)

    @classmethod
    def from_megatron_checkpoint(cls, path: str | Path) -> AutoBridge:
        """A bridge for a megabridge Megatron checkpoint (its megabridge.json says which model)."""
        ckpt = checkpointing.resolve(path)
        meta = checkpointing.read_metadata(ckpt)
        model_config = model_config_from_dict(meta["model_config"])
        hf = meta.get("hf") or {}
        if hf.get("config"):
            family = registry.bridge_for(_architecture(hf["config"], ckpt))
            hf_config = hf["config"]
        else:
            family = registry.bridge_for_family(model_config.family)
            hf_config = family.hf_config_dict(model_config)
        bridge = cls(family, model_config, hf_config, source_layout=hf.get("layout"))
        bridge.checkpoint_dir = ckpt
        assets = ckpt / HF_ASSETS
        bridge.sidecar_dir = assets if assets.is_dir() else None
        return bridge

    def use_hf_reference(self, path: str | Path) -> None:
        """Take config.json, shard layout, dtypes and tokenizer files from a reference HF folder."""
        ref = hf_io.HFCheckpoint(path)
        self.hf_config = ref.config_dict
        self.source_layout = _layout_of(ref)
        self.sidecar_dir = ref.path

    @staticmethod
    def list_supported() -> list[dict]:
        """One entry per family: its HF architectures, parallelisms and notes."""
        seen, out = set(), []
        for family in registry.bridges().values():
            if family not in seen:
                seen.add(family)
                out.append(family.describe())
        return out

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

        checkpointing.load(self.checkpoint_dir, model, model_only=True)

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
        from megatron.core.utils import unwrap_model

        chunks = [unwrap_model(m) for m in model]
        return transfer.export_hf_weights(
            chunks, self.family, _chunk_config(chunks), self._dtype_of(dtype)
        )

    def _dtype_of(self, dtype: torch.dtype | None):
        if dtype is not None:
            return lambda name: dtype
        dtypes = (self.source_layout or {}).get("dtypes")
        if dtypes:
            return lambda name: getattr(torch, dtypes[name]) if name in dtypes else None
        return None

    def hf_config_for_export(self, dtype: torch.dtype | None = None) -> dict:
        config = copy.deepcopy(self.hf_config)
        # Exports are never quantized: a quantized source (MXFP4) is written dequantized.
        config.pop("quantization_config", None)
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
        """Write an HF folder (rank 0 writes; every rank must call it). Atomic."""
        tensors = self.export_hf_weights(model, dtype)
        if dist.get_rank() != 0:
            for _ in tensors:  # take part in the collectives
                pass
            dist.barrier()
            return None
        layout = (self.source_layout or {}).get("weight_map") if dtype is None else None
        if progress:
            tensors = _progress(tensors, total=len(layout) if layout else None, desc="export")
        with hf_io.atomic_output_dir(out, overwrite) as tmp:
            hf_io.write_hf_folder(
                tmp, tensors, self.hf_config_for_export(dtype), self.sidecar_dir, layout
            )
        dist.barrier()
        return Path(out)

    def checkpoint_metadata(self) -> dict:
        """What megabridge.json keeps so that the checkpoint can go back to HF unchanged."""
        return {"hf": {"config": self.hf_config, "layout": self.source_layout}}


# ------------------------------------------------------------ helpers


def _layout_of(source: hf_io.HFCheckpoint) -> dict:
    return {
        "weight_map": source.files_by_name(),
        "dtypes": {n: str(source.dtype(n)).removeprefix("torch.") for n in source.keys()},
    }


def _progress(iterable, total, desc):
    from tqdm import tqdm

    yield from tqdm(iterable, total=total, desc=desc, unit="tensor", disable=None)


def _architecture(config_dict: dict, where) -> str:
    archs = config_dict.get("architectures") or []
    if not archs:
        raise UserError(f"{where}/config.json names no architectures")
    return archs[0]


def _transformers_config(config_dict: dict, path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means transformers cannot read it
        raise UserError(f"transformers cannot read {path}/config.json: {e}") from None


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
