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
"""

from __future__ import annotations

import math
import re
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megabridge.conversion import registry, sharding
from megabridge.errors import CheckpointError, ConfigError, UserError
from megabridge.models.specs import resolve_impl

# Re-exported: recipes read them without importing torch.
from megabridge.peft.targets import MEGATRON_TARGETS, default_targets  # noqa: E402,F401

ADAPTER_PARAMS = ("lora_a", "lora_b", "lora_magnitude")
# The adapter settings that decide what a checkpoint's adapter tensors mean.
_SHAPE_SETTINGS = ("method", "target_modules", "dim", "alpha")
_LAYER = re.compile(r"^decoder\.layers\.\d+\.(?:self_attention|mlp)\.(linear_\w+)$")
_MAPPED = re.compile(r"\.(?:self_attention|mlp)\.(linear_\w+)\.weight$")


# ------------------------------------------------------------------ which layers


def hf_names_by_target(family) -> dict[str, tuple[str, ...]]:
    """Megatron layer -> the HF module names fused into it, read from the family's mappings."""
    found: dict[str, tuple[str, ...]] = {}
    for mapping in family.MAPPINGS:
        m = _MAPPED.search(mapping.megatron)
        if m and m.group(1) in MEGATRON_TARGETS and ".experts." not in mapping.megatron:
            found[m.group(1)] = tuple(
                h.removesuffix(".weight").rsplit(".", 1)[-1] for h in mapping.hf
            )
    return found


def _family_names(family: str, hf_names: list[str]) -> dict[str, tuple[str, ...]]:
    try:
        return hf_names_by_target(registry.bridge_for_family(family))
    except UserError:
        raise ConfigError(
            f"peft.target_modules: HF names ({', '.join(hf_names)}) need a family with an HF "
            f"bridge, and model.family={family!r} has none; use Megatron names "
            f"({', '.join(MEGATRON_TARGETS)})"
        ) from None


def resolve_targets(names: list[str], family: str) -> list[str]:
    """The Megatron layers that ``names`` (Megatron or HF names) select, in model order."""
    if not names:
        raise ConfigError(
            f"peft.target_modules is empty; choose from {', '.join(MEGATRON_TARGETS)}"
        )
    chosen = {n for n in names if n in MEGATRON_TARGETS}
    hf = [n for n in dict.fromkeys(names) if n not in MEGATRON_TARGETS]
    if hf:
        groups = _family_names(family, hf)
        known = [leaf for leaves in groups.values() for leaf in leaves]
        unknown = [n for n in hf if n not in known]
        if unknown:
            raise ConfigError(
                f"peft.target_modules: unknown {', '.join(map(repr, unknown))}; expected Megatron "
                f"names ({', '.join(MEGATRON_TARGETS)}) or HF names of the {family} family "
                f"({', '.join(known)})"
            )
        for layer, leaves in groups.items():
            named = [leaf for leaf in leaves if leaf in hf]
            if named and len(named) < len(leaves):
                missing = [leaf for leaf in leaves if leaf not in hf]
                raise ConfigError(
                    f"peft.target_modules names {', '.join(named)} but not {', '.join(missing)}: "
                    f"Megatron fuses {', '.join(leaves)} into one layer ({layer}), adapted as a "
                    f"whole with one shared A; name all of them, or {layer}"
                )
            if named:
                chosen.add(layer)
    return [t for t in MEGATRON_TARGETS if t in chosen]


def config_problems(cfg) -> list[str]:
    """What is wrong with ``cfg.peft`` (for training/config.py's validate)."""
    p, problems = cfg.peft, []
    if p.dim < 1:
        problems.append(f"peft.dim={p.dim} must be >= 1")
    if p.alpha <= 0:
        problems.append(f"peft.alpha={p.alpha} must be > 0")
    if not 0.0 <= p.dropout < 1.0:
        problems.append(f"peft.dropout={p.dropout} must be in [0, 1)")
    try:
        resolve_targets(p.target_modules, cfg.model.family)
    except ConfigError as e:
        problems.append(str(e))
    try:
        impl = resolve_impl(cfg.model)
    except ConfigError:
        impl = None  # the model's own validation names this problem
    if impl == "transformer_engine":
        problems.append(
            f"peft.method={p.method} needs model.transformer_impl=torch (or local): the adapters "
            "wrap Megatron-Core's own parallel linears, and TE's layer-norm-fused linear_qkv "
            "never exposes the normalised input they read"
        )
    return problems


def settings(cfg) -> dict:
    """What a checkpoint records about its adapters, and what export rebuilds them from."""
    p, base = cfg.peft, cfg.checkpoint.pretrained_checkpoint
    return {
        "method": p.method,
        "target_modules": resolve_targets(p.target_modules, cfg.model.family),
        "dim": p.dim,
        "alpha": float(p.alpha),
        "dropout": p.dropout,
        "base": str(Path(base).resolve()) if base else None,  # the frozen weights' origin
        "seed": cfg.rng.seed,  # without a base: the weights megabridge initialised from this seed
    }


# ------------------------------------------------------------------ the adapted layer


def _tp(base) -> tuple[object, int]:
    group = base.tp_group
    return group, dist.get_world_size(group) if group is not None else 1


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

    # ---------------------------------------------------------------- forward

    def forward(self, x, *args, **kwargs):
        out, bias = self.base(x, *args, **kwargs)
        delta = self.scale * F.linear(self._low_rank(x), self.lora_b)  # [.., out_local]
        return self._combine(out, bias, delta)

    def _combine(self, out, bias, delta):
        return out + delta, bias

    def _low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """h = A dropout(x), complete on each rank: [s, b, r] (column) or its shard (row + SP)."""
        from megatron.core import tensor_parallel as tpl

        group, _ = _tp(self.base)
        h = F.linear(self._dropped(x), self.lora_a)
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
        return self.base.weight.float() + self.scale * (self.lora_b.float() @ self.lora_a.float())

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


def _wrap(name: str, module, target: str, s: dict, config):
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
    gated = target == "linear_fc1" and bool(config.gated_linear_unit)
    cls = DoRALinear if s["method"] == "dora" else LoRALinear
    return cls(module, kind, gated, s["dim"], s["alpha"], s["dropout"])


def add_adapters(model_chunks, s: dict) -> None:
    """Wrap the target layers of every chunk, initialise A, freeze the base (``s``: settings())."""
    found = set()
    for chunk in _unwrapped(model_chunks):
        for name, module in list(chunk.named_modules()):
            m = _LAYER.match(name)
            if m and m.group(1) in s["target_modules"]:
                parent, _, attr = name.rpartition(".")
                setattr(
                    chunk.get_submodule(parent),
                    attr,
                    _wrap(name, module, m.group(1), s, chunk.config),
                )
                found.add(m.group(1))
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
        f"peft.{k}: checkpoint {saved.get(k)!r} vs config {current[k]!r}"
        for k in _SHAPE_SETTINGS
        if saved.get(k) != current[k]
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
