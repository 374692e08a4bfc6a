"""LoRA and DoRA adapters on Megatron-Core's tensor-parallel linear layers.

    LoRA   y = W x + s B A dropout(x)                                   s = alpha / r
    DoRA   y = m / ||W + s B A||_row * (W x + s B A dropout(x))         the norm is a constant
                                                                        for autograd (DoRA 4.3)

``apply(model, cfg)`` (called by training/loop.py) wraps the layers that
``peft.target_modules`` names, by their Megatron name (linear_qkv, linear_proj,
linear_fc1, linear_fc2) or by the HF names the family's weight mappings fuse
into them (q_proj, k_proj, v_proj -> linear_qkv, ...), and freezes every other
parameter: Megatron-Core's DDP buckets and its optimizer take only parameters
that require grad. A fused layer is adapted whole; naming part of it (q_proj
and v_proj without k_proj) is a ConfigError, because one A is shared by all of
its HF projections.

Tensor parallelism. The adapter is split like its base layer, so no rank ever
holds more of it than of the base weight:

    ColumnParallelLinear  W [out/tp, in]   A [r, in] replicated       B [out/tp, r] split (dim 0)
    RowParallelLinear     W [out, in/tp]   A [r, in/tp] split (dim 1)  B [out, r] replicated

Only the low-rank activation h = A x ([tokens, r]) crosses ranks:

* column: h is the same on every rank; its gradient, partial per rank, is summed
  over TP (copy_to region). With sequence parallelism x is a sequence shard: h is
  all-gathered, and A (tagged ``sequence_parallel``) has its gradient summed over
  TP by Megatron-Core's finalize_model_grads, as layer norms do.
* row: h = sum over ranks of A_r x_r (all-reduce; reduce-scatter with sequence
  parallelism, where B is then the ``sequence_parallel`` one).

The gated MLP's fc1 keeps [gate_r; up_r] on each rank; its B rows follow the same
layout, so sharding.py and checkpoints treat B like the base weight.

The vision tower (``peft.vision_target_modules``). A tower built of Megatron-Core layers
(models/vision_encoder.py ``TowerLayers``) is adapted the same way, layer by layer. Its MLP
is zero-padded to a multiple of 64 units (conversion/vit.py padded_ffn), units that HF's
model does not have: the adapters never reach them (fc1's B rows and fc2's A columns of
the padded units are masked to zero), so merging leaves them zero and the export, which
drops them, loses nothing.
"""

from __future__ import annotations

import math
import re
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megabridge.conversion import sharding
from megabridge.errors import CheckpointError, ConfigError
from megabridge.models.vision_encoder import TowerLayers

# Which layers are adapted is torch-free (recipes and config checks read it): re-exported here.
from megabridge.peft.targets import (  # noqa: F401
    MEGATRON_TARGETS,
    config_problems,
    default_targets,
    hf_names_by_target,
    resolve_targets,
)

ADAPTER_PARAMS = ("lora_a", "lora_b", "lora_magnitude")
# The adapter settings that decide what a checkpoint's adapter tensors mean.
_SHAPE_SETTINGS = ("method", "target_modules", "vision_target_modules", "dim", "alpha")
_SETTING_DEFAULTS = {"vision_target_modules": []}  # what a checkpoint that predates one meant
_LAYER = re.compile(r"^decoder\.layers\.\d+\.(?:self_attention|mlp)\.(linear_\w+)$")
_TOWER_LAYER = r"\.\d+\.(?:self_attention|mlp)\.(linear_\w+)$"  # after a TowerLayers' name


def settings(cfg) -> dict:
    """What a checkpoint records about its adapters, and what export rebuilds them from."""
    p, base = cfg.peft, cfg.checkpoint.pretrained_checkpoint
    return {
        "method": p.method,
        "target_modules": resolve_targets(p.target_modules, cfg.model.family),
        "vision_target_modules": [t for t in MEGATRON_TARGETS if t in p.vision_target_modules],
        "dim": p.dim,
        "alpha": float(p.alpha),
        "dropout": p.dropout,
        "base": str(Path(base).resolve()) if base else None,  # the frozen weights' origin
        "seed": cfg.rng.seed,  # without a base: the weights megabridge initialised from this seed
        # what describes a foreign base checkpoint that carries no description (export needs it)
        "base_hf_config": _resolved(cfg.checkpoint.hf_config) if base else None,
    }


def _resolved(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


# ------------------------------------------------------------------ the adapted layer


def _tp(base) -> tuple[object, int]:
    group = base.tp_group
    return group, dist.get_world_size(group) if group is not None else 1


def _live_mask(base, kind: str, gated: bool, param) -> torch.Tensor | None:
    """1 for the units HF's model has, 0 for the zero padding (``base.live_units``: how many
    of a tower MLP's padded units are real, set by vision_encoder.TowerLayers), split like
    ``param``: B's rows [out_local, 1] (fc1), A's columns [1, in_local] (fc2); None: no padding.
    """
    live = getattr(base, "live_units", None)
    if live is None:
        return None
    group, size = _tp(base)
    rank = dist.get_rank(group) if size > 1 else 0
    padded = param.shape[0 if kind == "column" else 1] * size // (2 if gated else 1)
    unit = (torch.arange(padded, device=param.device) < live).to(param.dtype)
    full = torch.cat([unit, unit]) if gated else unit  # fc1 of a gated MLP: [gate; up]
    how = "gated_dim0" if gated else "dim0"
    local = sharding.split(full, how, rank, size)
    return local[:, None] if kind == "column" else local[None, :]


class LoRALinear(torch.nn.Module):
    """A Megatron-Core Column/RowParallelLinear plus a low-rank update; same call and return."""

    def __init__(self, base, kind: str, gated: bool, dim: int, alpha: float, dropout: float):
        from megatron.core.tensor_parallel.layers import (
            set_defaults_if_not_set_tensor_model_parallel_attributes as replicated,
        )
        from megatron.core.tensor_parallel.layers import (
            set_tensor_model_parallel_attributes as split,
        )

        super().__init__()
        self.base = base
        self.kind, self.gated = kind, gated  # "column" | "row"; fc1 of a gated MLP
        self.scale = alpha / dim
        self.dropout = dropout
        self.sequence_parallel = bool(base.sequence_parallel)
        out_local, in_local = base.weight.shape
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_a = torch.nn.Parameter(torch.zeros(dim, in_local, **like))  # set by init_a
        self.lora_b = torch.nn.Parameter(torch.zeros(out_local, dim, **like))  # zero: y = W x
        if kind == "column":
            replicated(self.lora_a)
            split(self.lora_b, True, 0, 1)
            self.lora_a.sequence_parallel = self.sequence_parallel
        else:
            split(self.lora_a, True, 1, 1)
            replicated(self.lora_b)
            self.lora_b.sequence_parallel = self.sequence_parallel
        if getattr(base.weight, "plain_fc1", False):  # sharding.param_split: not [gate; up]
            self.lora_b.plain_fc1 = True
        live = _live_mask(base, kind, gated, self.lora_b if kind == "column" else self.lora_a)
        self.register_buffer("live", live, persistent=False)

    # ---------------------------------------------------------------- forward

    def forward(self, x, *args, **kwargs):
        out, bias = self.base(x, *args, **kwargs)
        delta = self.scale * F.linear(self._low_rank(x), self._b())  # [.., out_local]
        return self._combine(out, bias, delta)

    def _a(self) -> torch.Tensor:
        """A, its columns of padded units zero (a row layer's input: a tower's fc2)."""
        return (
            self.lora_a if self.live is None or self.kind == "column" else self.lora_a * self.live
        )

    def _b(self) -> torch.Tensor:
        """B, its rows of padded units zero (a column layer's output: a tower's fc1)."""
        return self.lora_b if self.live is None or self.kind == "row" else self.lora_b * self.live

    def _combine(self, out, bias, delta):
        return out + delta, bias

    def _low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """h = A dropout(x), complete on each rank: [s, b, r] (column) or its shard (row + SP)."""
        from megatron.core import tensor_parallel as tpl

        group, _ = _tp(self.base)
        h = F.linear(self._dropped(x), self._a())
        if self.kind == "column":
            if self.sequence_parallel:
                return tpl.gather_from_sequence_parallel_region(h, True, group=group)
            return tpl.copy_to_tensor_model_parallel_region(h, group=group)
        if self.sequence_parallel:
            return tpl.reduce_scatter_to_sequence_parallel_region(h, group=group)
        return tpl.reduce_from_tensor_model_parallel_region(h, group=group)

    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropout == 0.0:
            return x
        if self.kind == "row" or self.sequence_parallel:
            # x differs between TP ranks: draw from the model-parallel RNG stream
            from megatron.core import tensor_parallel

            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.dropout(x, self.dropout, training=True)
        return F.dropout(x, self.dropout, training=True)  # replicated x: the same mask everywhere

    # ---------------------------------------------------------------- merging

    @torch.no_grad()
    def adapted_weight(self) -> torch.Tensor:
        """W + s B A for this rank's piece, in fp32."""
        return self.base.weight.float() + self.scale * (self._b().float() @ self._a().float())

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight that gives this layer's output without the adapter, in fp32."""
        return self.adapted_weight()

    @torch.no_grad()
    def merge(self) -> None:
        self.base.weight.copy_(self.merged_weight().to(self.base.weight.dtype))

    # ---------------------------------------------------------------- checkpoints

    def _adapter_axes(self) -> dict[str, int]:
        return {"lora_a": 1} if self.kind == "row" else {"lora_b": 0}

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        sd = self.base.sharded_state_dict(f"{prefix}base.", sharded_offsets, metadata)
        own = {n: p for n, p in self.named_parameters(recurse=False)}
        sd.update(
            make_sharded_tensors_for_checkpoint(
                own,
                prefix,
                self._adapter_axes(),
                sharded_offsets,
                tp_group=self.base.tp_group,
                dp_cp_group=metadata["dp_cp_group"],
            )  # fmt: skip
        )
        if self.gated:  # [gate_r; up_r] rows: saved as two halves, as Megatron's MLP does
            singleton = metadata.get("singleton_local_shards", False)
            for key in list(sd):
                if key[len(prefix) :] in ("base.weight", "base.bias", "lora_b", "lora_magnitude"):
                    sd[key] = apply_swiglu_sharded_factory(sd[key], sharded_offsets, singleton)
        return sd


class DoRALinear(LoRALinear):
    """DoRA: LoRA's direction, scaled per output row to a learned magnitude m."""

    def __init__(self, base, kind: str, gated: bool, dim: int, alpha: float, dropout: float):
        from megatron.core.tensor_parallel.layers import (
            set_defaults_if_not_set_tensor_model_parallel_attributes as replicated,
        )
        from megatron.core.tensor_parallel.layers import (
            set_tensor_model_parallel_attributes as split,
        )

        super().__init__(base, kind, gated, dim, alpha, dropout)
        # In the model's dtype: Megatron-Core's bf16 optimizer cannot checkpoint fp32 params.
        self.lora_magnitude = torch.nn.Parameter(self._row_norm().to(base.weight.dtype))
        if kind == "column":
            split(self.lora_magnitude, True, 0, 1)
        else:
            replicated(self.lora_magnitude)
            self.lora_magnitude.sequence_parallel = self.sequence_parallel

    @torch.no_grad()
    def _row_norm(self) -> torch.Tensor:
        """||W + s B A|| over the (whole) input dimension, per output row: [out_local], fp32."""
        squares = self.adapted_weight().square().sum(dim=1)
        group, size = _tp(self.base)
        if self.kind == "row" and size > 1:  # the input dimension is split over TP
            dist.all_reduce(squares, group=group)
        return squares.sqrt()

    def _scale(self) -> torch.Tensor:
        """m / ||W + s B A||_row in fp32, the norm rounded like m: exactly 1 at the start."""
        m = self.lora_magnitude
        return m.float() / self._row_norm().to(m.dtype).float()

    def _combine(self, out, bias, delta):
        base_bias = None if bias is not None else getattr(self.base, "bias", None)
        if base_bias is not None:  # the base added its bias: scale W x only
            out = out - base_bias
        scale = self._scale().to(out.dtype)
        y = scale * (out + delta)
        return (y if base_bias is None else y + base_bias), bias

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        weight = self.adapted_weight()
        return weight * self._scale().detach().unsqueeze(1)

    def _adapter_axes(self) -> dict[str, int]:
        return {"lora_a": 1} if self.kind == "row" else {"lora_b": 0, "lora_magnitude": 0}


# ------------------------------------------------------------------ the model


def apply(model_chunks, cfg) -> None:
    """Adapt ``peft.target_modules`` and freeze everything else (training/loop.py's hook)."""
    add_adapters(model_chunks, settings(cfg))


def _unwrapped(model_chunks):
    from megatron.core.utils import unwrap_model

    return [unwrap_model(m) for m in model_chunks]


def _wrap(name: str, module, target: str, s: dict):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if isinstance(module, ColumnParallelLinear) and not module.gather_output:
        kind = "column"
    elif isinstance(module, RowParallelLinear) and module.input_is_parallel:
        kind = "row"
    else:
        raise ConfigError(
            f"{name} is a {type(module).__name__}: {s['method']} wraps Megatron-Core's "
            "ColumnParallelLinear / RowParallelLinear only (use model.transformer_impl=torch)"
        )
    gated = target == "linear_fc1" and bool(module.config.gated_linear_unit)  # a tower's own
    cls = DoRALinear if s["method"] == "dora" else LoRALinear
    return cls(module, kind, gated, s["dim"], s["alpha"], s["dropout"])


def _targets(chunk, s: dict):
    """(name, module, target, in the tower) of every layer that ``s`` adapts in ``chunk``."""
    towers = [n for n, m in chunk.named_modules() if isinstance(m, TowerLayers)]
    tower_layer = re.compile(f"^(?:{'|'.join(map(re.escape, towers))}){_TOWER_LAYER}")
    for name, module in list(chunk.named_modules()):
        if m := _LAYER.match(name):
            if m.group(1) in s["target_modules"]:
                yield name, module, m.group(1), False
        elif towers and (m := tower_layer.match(name)):
            if m.group(1) in s.get("vision_target_modules", ()):
                yield name, module, m.group(1), True


def add_adapters(model_chunks, s: dict) -> None:
    """Wrap the target layers of every chunk, initialise A, freeze the base (``s``: settings())."""
    found, tower_found = set(), set()
    for chunk in _unwrapped(model_chunks):
        for name, module, target, in_tower in _targets(chunk, s):
            parent, _, attr = name.rpartition(".")
            setattr(chunk.get_submodule(parent), attr, _wrap(name, module, target, s))
            (tower_found if in_tower else found).add(target)
        for name, param in chunk.named_parameters():
            param.requires_grad_(is_adapter(name))
        _init_a(chunk, s["seed"])
        chunk.megabridge_peft = dict(s)
    missing = [t for t in s["target_modules"] if t not in _on_any_stage(found)]
    if missing:
        raise ConfigError(
            f"peft.target_modules: this model has no {', '.join(missing)} layer to adapt "
            "(only the dense attention and MLP projections of decoder layers are; "
            "MoE experts are not supported yet)"
        )
    _check_tower_found(s.get("vision_target_modules", []), tower_found)


def _check_tower_found(targets: list[str], found: set[str]) -> None:
    """The tower sits on the first pipeline stage: it is there, or no stage has it."""
    from megatron.core import parallel_state as ps

    first = not ps.model_parallel_is_initialized() or ps.is_pipeline_first_stage()
    missing = [t for t in targets if t not in found]
    if first and missing:
        raise ConfigError(
            f"peft.vision_target_modules: this model's vision tower has no "
            f"{', '.join(missing)} layer to adapt (only towers of Megatron-Core layers are: "
            "Qwen2.5-VL's, Qwen3-VL's)"
        )


def _on_any_stage(found: set[str]) -> set[str]:
    """The targets found on any pipeline stage: a stage holds only some of the layers (all of
    DeepSeek-V3's dense MLPs are on the first stage), so one stage's lack is no error."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_pipeline_model_parallel_world_size() == 1:
        return found
    stages = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(stages, sorted(found), group=ps.get_pipeline_model_parallel_group())
    return set().union(*stages)


@torch.no_grad()
def _init_a(chunk, seed: int) -> None:
    """A ~ U(+-1/sqrt(in)) (kaiming-uniform, as peft does), drawn whole from (seed, global name)
    and then split: every TP/PP layout starts from the same adapters, as models/init.py does."""
    from megatron.core import parallel_state as ps

    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    for local_name, param in chunk.named_parameters():
        if not local_name.endswith(".lora_a"):
            continue
        name = sharding.global_name(chunk, local_name)
        how = sharding.param_split(local_name, param, gated=False)
        rows, cols = param.shape
        cols *= size if how == "dim1" else 1
        gen = torch.Generator(device=param.device).manual_seed(
            zlib.crc32(f"{seed}:{name}".encode())
        )
        full = torch.rand(rows, cols, generator=gen, device=param.device) * 2.0 - 1.0
        param.copy_(sharding.split(full / math.sqrt(cols), how, rank, size))


def is_adapter(param_name: str) -> bool:
    return param_name.rpartition(".")[2] in ADAPTER_PARAMS


@torch.no_grad()
def merge_and_unload(model_chunks) -> None:
    """Fold every adapter into its base weight (fp32, then the weight's dtype); unwrap."""
    for chunk in _unwrapped(model_chunks):
        for name, module in list(chunk.named_modules()):
            if isinstance(module, LoRALinear):
                module.merge()
                parent, _, attr = name.rpartition(".")
                setattr(chunk.get_submodule(parent), attr, module.base)
        for param in chunk.parameters():
            param.requires_grad_(True)
        del chunk.megabridge_peft


# ------------------------------------------------------------------ checkpoints


def adapter_state(model, sharded_sd: dict) -> dict:
    """The adapter entries of a model's sharded state dict: what a PEFT checkpoint holds."""
    keys = {name for name, _ in model.named_parameters() if is_adapter(name)}
    return {k: v for k, v in sharded_sd.items() if k in keys}


def load_adapter_state(model, state: dict, ckpt_dir) -> None:
    """Load adapter tensors; the frozen base stays as it was loaded (from the pretrained model)."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if is_adapter(k)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} does not match this model's adapters (missing: "
            f"{', '.join(missing[:4]) or '-'}; unexpected: {', '.join(result.unexpected_keys[:4]) or '-'})"
        )


def check_checkpoint(saved: dict | None, current: dict | None, ckpt_dir, resuming: bool) -> None:
    """Refuse to mix adapter-only and full checkpoints, or adapters of another shape or base."""
    if saved is None and current is None:
        return
    if current is None:
        raise CheckpointError(
            f"{ckpt_dir} is a {saved['method']} checkpoint holding the adapters only: export it "
            f"with `megabridge export --megatron-path {ckpt_dir} --hf-path OUT` (merged into its "
            f"base), or resume it with peft.method={saved['method']}"
        )
    if saved is None:
        raise CheckpointError(
            f"{ckpt_dir} is a full-model checkpoint without adapters; start a "
            f"{current['method']} run from it with checkpoint.pretrained_checkpoint={ckpt_dir}"
        )
    diffs = [
        f"peft.{k}: checkpoint {saved.get(k, _SETTING_DEFAULTS.get(k))!r} vs config "
        f"{current.get(k, _SETTING_DEFAULTS.get(k))!r}"
        for k in _SHAPE_SETTINGS
        if saved.get(k, _SETTING_DEFAULTS.get(k)) != current.get(k, _SETTING_DEFAULTS.get(k))
    ]
    if resuming and saved.get("base") != current["base"]:
        diffs.append(
            f"checkpoint.pretrained_checkpoint: checkpoint {saved.get('base')!r} "
            f"vs config {current['base']!r}"
        )
    elif resuming and current["base"] is None and saved.get("seed") != current["seed"]:
        diffs.append(f"rng.seed of the initialised base: {saved.get('seed')} vs {current['seed']}")
    if diffs:
        raise CheckpointError(f"checkpoint {ckpt_dir} has other adapters ({'; '.join(diffs)})")
