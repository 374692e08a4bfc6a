"""Repeated weight syncs: what stays the same from one sync to the next, worked out once.

An RL loop syncs the same model into the same consumer after every training step.
The optimizer updates the parameters in place, so between two syncs only the values
change: the global parameter list (who owns what), each parameter's HF names and
mapping, the views of Megatron's tensors that are HF tensors (the q / k / v rows of
the fused linear_qkv, gate and up of linear_fc1: views stay valid while the values
change) and, for a transformers model, the tensor each HF tensor is copied into.

    plan = bridge.sync_plan(model, HFModelConsumer(hf_model) if rank == 0 else None, dst=0)
    for step in ...:
        train_step(...)
        plan.sync()            # every rank; same result and errors as bridge.sync_weights

Per sync, the parameters this rank holds whole (no gather: TP=1, or replicated) go
straight into an HFModelConsumer's tensors in a few batched copies (small ones
through ``torch._foreach_copy_``, which also casts dtypes; large ones one device copy
each), after the stream; a generic consumer (``load_weights(iterable)``) gets them as
views of the live parameters, bucketed (as the stream gives them in one process): it
copies them, as vLLM's load_weights does, before training changes them again. The other parameters are gathered / broadcast / sent as the stream
does (transfer.py), in the same global order on every rank.

The plan is rebuilt, on every rank at once (the ranks agree first, so none skips a
collective another runs), when any rank's parameters or the consumer's tensors are
no longer the same storage: a parameter replaced or moved, adapters added or merged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megabridge.conversion import transfer, weight_sync
from megabridge.conversion.weight_sync import HFModelConsumer
from megabridge.errors import ConversionError, UserError

# A tensor up to this size is copied in a batched (multi-tensor) kernel: launching one
# copy each would cost more than the copy. Larger ones get one plain device copy each,
# which runs at full memory bandwidth.
FOREACH_MAX_BYTES = 1 << 20


@dataclass
class _Step:
    """One global parameter as this rank handles it on every sync."""

    entry: transfer.Entry
    mine: transfer.ExportParam | None  # this rank's piece, if it holds one
    mapping: object
    hf_names: tuple[str, ...]
    local: bool  # this rank yields it, and its whole tensor is this rank's parameter
    views: list | None = None  # local, and every HF tensor a view of it: (hf_name, view)
    direct: bool = False  # copied straight into the HFModelConsumer, not yielded
    expert: int | None = None  # its HF tensors are this expert's slice of stacked ones


class SyncPlan:
    """Syncs ``model`` into ``consumer`` (None on ranks without one) again and again;
    ``sync()`` is a collective with bridge.sync_weights' results and errors."""

    def __init__(self, model, chunks, family, cfg, consumer, dtype=None,
                 bucket_bytes=weight_sync.DEFAULT_BUCKET_BYTES, merge_lora=True, dst=None):  # fmt: skip
        world = dist.get_world_size() if dist.is_initialized() else 1
        if dst is not None and not 0 <= dst < world:
            raise UserError(f"dst={dst} is not a rank of this job (world size {world})")
        if bucket_bytes <= 0:
            raise UserError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.model, self.consumer, self.dtype = model, consumer, dtype
        self._chunks, self._family, self._cfg = chunks, family, cfg
        self._bucket_bytes, self._merge_lora, self._dst = bucket_bytes, merge_lora, dst
        self._world = world
        self._device = next(chunks[0].parameters()).device
        self._steps: list[_Step] | None = None
        self._streamed: list[_Step] = []  # the steps a sync runs, in the global order
        self._storage: list | None = None
        self._direct, self._bind_error = None, None
        self._stacks = transfer.ExpertStacks(cfg.num_moe_experts)
        self.builds = 0  # how many times the plan was worked out (a test counts them)

    def sync(self) -> dict:
        """{"tensors": n, "bytes": b} that this rank's consumer took."""
        weight_sync.gather_pending_params(self.model)
        self._stacks = transfer.ExpertStacks(self._cfg.num_moe_experts)  # none left from a failure
        try:
            self._refresh()
            return weight_sync.sync_weights(
                _Stream(self), self.consumer, self._bucket_bytes, self._bind_error, self._direct
            )
        except Exception:
            # sync_weights' errors are agreed (every rank raises them), and a build's
            # come from the same catalogue everywhere: every rank rebuilds next time
            self._steps = None
            raise

    # ------------------------------------------------------------ building

    def _refresh(self) -> None:
        storage = self._current_storage()
        stale = self._steps is None or storage != self._storage
        if self._world > 1:  # rebuilding runs collectives: all ranks or none
            flag = torch.tensor([int(stale)], device=self._device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stale = bool(flag.item())
        if stale:
            self._build()
            self._storage = storage

    def _current_storage(self) -> list:
        """(identity, address) of every tensor the plan reads or writes."""
        # one walk over the modules, reading their tensor tables directly: this runs on
        # every sync, and parameters() + named_buffers() would walk the tree twice more
        storage = []
        for chunk in self._chunks:
            for module in chunk.modules():
                skip = module._non_persistent_buffers_set
                for tensors in (module._parameters, module._buffers):
                    for name, t in tensors.items():
                        if t is not None and name not in skip:
                            storage.append((id(t), t.data_ptr()))
        if isinstance(self.consumer, HFModelConsumer):
            storage += [(id(t), t.data_ptr()) for t in self.consumer.targets.values()]
        return storage

    def _build(self) -> None:
        cfg = self._cfg
        params = weight_sync.sync_params(self._chunks, cfg, self._merge_lora)
        entries = transfer.catalogue(params, cfg)  # a collective
        local = {p.name: p for p in params}
        yields = self._world == 1 or self._dst is None or self._dst == dist.get_rank()
        self._steps = []
        for entry in entries:
            mine = local.get(entry.name)
            mapping, hf_names = self._family.resolve(entry.name)
            step = _Step(entry, mine, mapping, hf_names, yields and _whole_here(entry, mine))
            step.expert = mapping.expert_of(entry.name)
            if step.local and step.expert is None:  # an expert's slice is stacked: a new tensor
                outputs = mapping.megatron_to_hf(_full(step, cfg), cfg)
                if all(_shares(t, mine.param) for t in outputs):
                    step.views = list(zip(hf_names, outputs, strict=True))
            self._steps.append(step)
        self._direct, self._bind_error = None, None
        if isinstance(self.consumer, HFModelConsumer):
            try:
                self._direct = _DirectCopies(self.consumer, self._bind(self.consumer), self.dtype)
            except ConversionError as e:  # agreed on in sync_weights, after the collectives
                self._bind_error = weight_sync.one_line(e)
        # one process: the direct steps need no collective, so a sync skips them entirely
        self._streamed = [st for st in self._steps if self._world > 1 or not st.direct]
        self.builds += 1

    def _bind(self, consumer: HFModelConsumer) -> list:
        """(consumer tensor, destination view, source view) for every local parameter's HF
        tensors that can be copied straight in; marks those steps direct."""
        pairs = []
        for step in self._steps:
            if not step.local or step.expert is not None:
                continue
            full = _full(step, self._cfg)
            sources = step.mapping.megatron_to_hf_views(full, self._cfg)
            shapes = [tuple(t.shape) for t in step.mapping.megatron_to_hf(full, self._cfg)]
            planned = []
            for hf_name, shape, source in zip(step.hf_names, shapes, sources, strict=True):
                target, _, dest = consumer.place(hf_name, shape)  # names and shapes checked
                if not _shares(source, step.mine.param) or self.dtype not in (
                    None, source.dtype, dest.dtype,  # else two roundings, as the stream does
                ):  # fmt: skip
                    break
                try:
                    planned.append((target, dest.view(source.shape), source))
                except RuntimeError:  # a destination that cannot take the source's shape
                    break
            else:
                step.direct = True
                pairs += planned
        return pairs

    # ------------------------------------------------------------ one sync

    def _run(self, step: _Step, wanted: bool = True) -> list:
        """Take part in ``step``'s collectives; the (hf_name, tensor) it yields here."""
        full = None
        if self._world > 1 or not step.local:
            full = transfer.whole(step.entry, step.mine, self._device, self._dst)
        if not wanted or step.direct or not (step.local or full is not None):
            return []
        if step.views is not None:
            outputs = step.views
        else:
            if full is None:  # local, one process: the parameter itself
                full = step.mine.param.detach()
            full = transfer.unpadded(full, step.entry.name, self._cfg)
            outputs = zip(step.hf_names, step.mapping.megatron_to_hf(full, self._cfg), strict=True)
        if step.expert is not None:  # yielded once every expert's slice has come
            stacked = [(n, self._stacks.add(n, step.expert, t)) for n, t in outputs]
            outputs = [(n, t) for n, t in stacked if t is not None]
        dtype = self.dtype
        return [(n, t if dtype is None or t.dtype == dtype else t.to(dtype)) for n, t in outputs]


class _Stream:
    """A plan's (hf_name, tensor) pairs for one sync; ``close()`` runs the collectives left."""

    def __init__(self, plan: SyncPlan):
        self._plan, self._index, self._ready = plan, 0, []

    def __iter__(self):
        return self

    @torch.no_grad()
    def __next__(self) -> tuple[str, torch.Tensor]:
        steps = self._plan._streamed
        while not self._ready:
            if self._index == len(steps):
                raise StopIteration
            self._ready = self._plan._run(steps[self._index])[::-1]
            self._index += 1
        return self._ready.pop()

    @torch.no_grad()
    def close(self) -> None:
        self._ready = []
        steps = self._plan._streamed
        while self._index < len(steps):
            self._plan._run(steps[self._index], wanted=False)
            self._index += 1


class _DirectCopies:
    """The copies from Megatron's parameters into a transformers model, batched once."""

    def __init__(self, consumer: HFModelConsumer, pairs: list, dtype: torch.dtype | None):
        self._consumer = consumer
        batched: dict[tuple, tuple[list, list]] = {}
        self._one_by_one = []
        self._filled: dict[int, int] = {}
        self.count, self.nbytes = len(pairs), 0
        for target, dest, source in pairs:
            size = source.numel() * source.element_size()
            self.nbytes += source.numel() * (dtype or source.dtype).itemsize
            self._filled[id(target)] = self._filled.get(id(target), 0) + 1
            if size <= FOREACH_MAX_BYTES and dest.is_contiguous() and source.is_contiguous():
                key = (dest.dtype, source.dtype, dest.device, source.device)
                dests, sources = batched.setdefault(key, ([], []))
                dests.append(dest)
                sources.append(source)
            else:
                self._one_by_one.append((dest, source))
        self._batched = list(batched.values())

    @torch.no_grad()
    def __call__(self) -> tuple[int, int]:
        for dests, sources in self._batched:
            torch._foreach_copy_(dests, sources)
        for dest, source in self._one_by_one:
            dest.copy_(source)
        filled = self._consumer.filled  # what finish() checks
        for key, count in self._filled.items():
            filled[key] = filled.get(key, 0) + count
        return self.count, self.nbytes


def _whole_here(entry: transfer.Entry, mine: transfer.ExportParam | None) -> bool:
    """This rank's parameter is the whole tensor: no gather, no adapter merged in."""
    if mine is None or mine.value is not None:
        return False
    group, replica = transfer.param_groups(mine.local_name)
    return replica == 0 and (entry.how == "replicated" or dist.get_world_size(group) == 1)


def _full(step: _Step, cfg) -> torch.Tensor:
    return transfer.unpadded(step.mine.param.detach(), step.entry.name, cfg)


def _shares(tensor: torch.Tensor, param: torch.Tensor) -> bool:
    return tensor.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
