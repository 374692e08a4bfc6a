"""Weight sync: a sharded (TP / PP / EP, LoRA) Megatron model -> HF-named whole tensors.

What RL loops and serving do after each training step: copy the trained weights,
under HF names, into an inference engine or a transformers model.

    stream = bridge.stream_hf_weights(model, dtype=torch.bfloat16, dst=0)
    for bucket in weight_sync.buckets(stream, 256 << 20): engine.load_weights(bucket)

or, with the agreed error handling (below), in one call on every rank:

    bridge.sync_weights(model, HFModelConsumer(hf_model) if rank == 0 else None, dst=0)

Which ranks get the tensors. Every rank walks one global list of the model's
parameters in the same order (by owning rank, then its parameter order). For each,
the data-parallel replica 0 of its tensor- (or expert-) parallel group gathers it
whole, and the first of them (the owner: on the pipeline stage, expert rank that
holds it) hands it on: ``dst=None`` broadcasts it and every rank yields it;
``dst=r`` sends it to rank ``r`` only, which alone yields (the others yield
nothing but take part). Only one parameter is whole at a time.

LoRA / DoRA adapters are merged on the fly (``merge_lora=True``: W + s B A, in fp32,
cast to the weight's dtype), layer by layer; the model itself is left unchanged.
``merge_lora=False`` streams the frozen base weights alone.

The consumer protocol is vLLM's: an object with ``load_weights(weights)`` that
takes an iterable of (hf_name, tensor), called once per bucket; an optional
``finish()`` is called after the last one (to check completeness). A consumer
that raises does not stop the other ranks: sync_weights runs the remaining
collectives, then every rank learns every rank's error and raises the same
ConversionError (never a hang, never an error on one rank only).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Protocol

import torch
import torch.distributed as dist

from megabridge.conversion import transfer
from megabridge.errors import ConversionError, UserError
from megabridge.peft import lora

DEFAULT_BUCKET_BYTES = 512 << 20


class WeightConsumer(Protocol):
    """What sync_weights feeds: vLLM's ``model.load_weights`` has this shape."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]): ...


def sync_params(chunks, cfg, merge_lora: bool = True) -> list[transfer.ExportParam]:
    """This rank's parameters as the HF export sees them: LoRA layers as their base
    weights (merged with the adapter when ``merge_lora``), the adapters themselves left out."""
    out = []
    for chunk, local_name, name, param in transfer.local_params(chunks, cfg):
        if lora.is_adapter(local_name):
            continue
        layer, _, leaf = local_name.rpartition(".")
        if not layer.endswith(".base"):
            out.append(transfer.ExportParam(local_name, name, param))
            continue
        module = chunk.get_submodule(layer.removesuffix(".base"))
        exported = name.replace(".base.", ".")  # the layer's own weight, as the HF mapping knows it
        value = None
        if merge_lora and leaf == "weight" and isinstance(module, lora.LoRALinear):
            value = _merged(module, param.dtype)
        out.append(transfer.ExportParam(local_name, exported, param, value))
    return out


def gather_pending_params(model) -> None:
    """Complete the weights that the distributed optimizer has not all-gathered yet.

    With ``dist.overlap_param_gather``, Megatron-Core's DDP gathers the updated
    parameters in the next forward's pre-hooks, so right after a step each rank holds
    only its shard of them; here they are gathered now, as Megatron-LM does before
    evaluating (the hooks stay, and the next forward gathers the same values again).
    """
    for chunk in model:
        if getattr(chunk, "use_forward_hook", False):
            chunk.disable_forward_pre_hook(param_sync=True)
            chunk.enable_forward_pre_hook()


def _merged(module, dtype: torch.dtype):
    return lambda: module.merged_weight().to(dtype)


def stream(
    chunks, family, cfg, dtype=None, merge_lora: bool = True, dst: int | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, whole tensor) pairs; see the module docstring for who gets them.

    A collective: every rank iterates it to the end, or closes it (``close()``,
    ``contextlib.closing``), which runs the collectives left without yielding.
    """
    if dst is not None and not 0 <= dst < dist.get_world_size():
        raise UserError(f"dst={dst} is not a rank of this job (world size {dist.get_world_size()})")
    dtype_of = (lambda name: dtype) if dtype is not None else None
    params = sync_params(chunks, cfg, merge_lora)
    return transfer.export_hf_weights(chunks, family, cfg, dtype_of, params=params, dst=dst)


def buckets(
    tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Lists of (name, tensor) of at most ``bucket_bytes`` each (a larger tensor: alone)."""
    if bucket_bytes <= 0:
        raise UserError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket, size = [], 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def sync_weights(
    tensors: Iterator[tuple[str, torch.Tensor]],
    consumer: WeightConsumer | None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    error: str | None = None,
    direct=None,
) -> dict:
    """Feed ``tensors`` (a stream) to ``consumer`` bucket by bucket, on every rank.

    Ranks without a consumer pass None. Returns {"tensors": n, "bytes": b} of what
    this rank's consumer took. Raises ConversionError on every rank if any rank's
    consumer failed (or came with an ``error`` already: the stream is still run).
    ``direct()`` (a SyncPlan's copies straight into the consumer's tensors) runs after
    the last bucket and before ``finish()``, and returns its own (tensors, bytes).
    """
    count, nbytes = 0, 0
    try:
        for bucket in buckets(tensors, bucket_bytes):
            if consumer is None or error is not None:
                continue  # keep taking part in the collectives
            try:
                consumer.load_weights(bucket)
            except Exception as e:  # noqa: BLE001 - any consumer failure is agreed on below
                error = one_line(e)
            count += len(bucket)
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
        if consumer is not None and error is None:
            try:
                if direct is not None:
                    count, nbytes = (a + b for a, b in zip((count, nbytes), direct(), strict=True))
                if hasattr(consumer, "finish"):
                    consumer.finish()
            except Exception as e:  # noqa: BLE001
                error = one_line(e)
    finally:
        if hasattr(tensors, "close"):
            tensors.close()
    agree(error)
    return {"tensors": count, "bytes": nbytes}


def one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if isinstance(e, UserError) and text else f"{type(e).__name__}: {e}"


def agree(error: str | None) -> None:
    """Raise the same error on every rank if any rank has one."""
    everyone = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, error)
    failed = [(rank, e) for rank, e in enumerate(everyone) if e is not None]
    if failed:
        rank, first = failed[0]
        more = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
        raise ConversionError(f"weight sync failed on rank {rank}{more}: {first}")


class HFModelConsumer:
    """Updates a live transformers model in place: names and shapes checked, dtypes cast.

    Names are the checkpoint's (what save_pretrained writes). Where transformers
    stores a tensor differently in memory than in its files (its MoE experts fused
    into one [experts, ...] parameter), the model's own load-time conversions
    (transformers' conversion mapping) say where each tensor goes, and it is copied
    into its slice. Tied parameters (lm_head = embed_tokens) are one tensor: filled
    once. ``finish()`` checks that every parameter and persistent buffer was filled.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.targets = dict(model.state_dict(keep_vars=True))
        self.transforms = _load_transforms(model)
        self.filled: dict[int, int] = {}  # id(target) -> tensors written into it
        self.needed: dict[int, int] = {id(t): 1 for t in self.targets.values()}
        self._placed: dict[str, tuple] = {}  # name -> place(name) and the storage it saw

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        dests, tensors, targets = [], [], []
        for name, tensor in weights:
            target, _, dest = self.place(name, tuple(tensor.shape))
            dests.append(dest)
            tensors.append(tensor)
            targets.append(id(target))
        # one call for the bucket: torch batches the copies (and casts) of same-dtype
        # dense tensors into a few kernels, and copies the others one by one in C++
        if dests:
            torch._foreach_copy_(dests, tensors)
        for key in targets:
            self.filled[key] = self.filled.get(key, 0) + 1

    def place(
        self, name: str, shape: tuple | None = None
    ) -> tuple[torch.Tensor, str, torch.Tensor]:
        """(model tensor, its name, the view of it that ``name`` fills), checked against
        the ``shape`` the sync gives. Remembered per name while the tensor keeps its storage."""
        placed = self._placed.get(name)
        if placed is None or placed[0].data_ptr() != placed[3]:
            target, key, dest = self._place(name)
            placed = self._placed[name] = (target, key, dest, target.data_ptr())
        target, key, dest, _ = placed
        if shape is not None and tuple(dest.shape) != shape:
            raise ConversionError(
                f"shape mismatch for {name}: the sync gives {shape}, "
                f"the transformers model has {tuple(dest.shape)} ({key})"
            )
        return target, key, dest

    def _place(self, name: str) -> tuple[torch.Tensor, str, torch.Tensor]:
        key, fused = name, None
        for transform in self.transforms:
            renamed, pattern = transform.rename_source_key(key)
            if pattern is None:
                continue
            if hasattr(transform, "operations"):
                fused = (transform, pattern, key)
                key = renamed
                break
            key = renamed
        target = self.targets.get(key)
        if target is None:
            raise ConversionError(
                f"the transformers model ({type(self.model).__name__}) has no tensor {name}"
            )
        if fused is None:
            return target, key, target.data
        view, parts = _fused_slice(target, *fused)
        self.needed[id(target)] = parts
        return target, key, view

    def finish(self) -> None:
        missing = [
            n for n, t in self.targets.items() if self.filled.get(id(t), 0) < self.needed[id(t)]
        ]
        if missing:
            shown = ", ".join(missing[:8]) + (
                f" ... ({len(missing)} in all)" if len(missing) > 8 else ""
            )
            raise ConversionError(f"the sync did not fill these transformers tensors: {shown}")
        self.filled.clear()


def _load_transforms(model) -> list:
    """transformers' load-time renamings and fusions for ``model`` (none before transformers 5)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:
        return []
    if not hasattr(model, "config"):
        return []
    return list(get_model_conversion_mapping(model))


def _fused_slice(target: torch.Tensor, transform, pattern: str, name: str):
    """The slice of a fused expert tensor [experts, ...] that the file tensor ``name`` is,
    for the fusions transformers uses: experts stacked (MergeModulelist), then optionally
    the projections concatenated (Concatenate, e.g. gate and up)."""
    ops = [type(op).__name__ for op in transform.operations]
    if ops not in (["MergeModulelist"], ["MergeModulelist", "Concatenate"]):
        raise ConversionError(
            f"{name}: transformers fuses it with {ops}; the sync does not support that yet"
        )
    match = re.search(re.escape(pattern.strip(".")).replace(r"\*", r"(\d+)"), name)
    if match is None or transform.operations[0].dim != 0:
        raise ConversionError(f"{name}: cannot tell which expert it is ({pattern})")
    expert = int(match.group(1))
    view = target.data[expert]
    sources = transform.source_patterns
    if len(ops) == 2:
        dim = transform.operations[1].dim - 1  # of one expert's tensor
        size = view.shape[dim] // len(sources)
        view = view.narrow(dim, sources.index(pattern) * size, size)
    return view, target.shape[0] * len(sources)
