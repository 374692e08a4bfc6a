"""What autograd keeps for backward during one forward: activation memory, by the module that
kept it.

``SavedTensorLog(model)`` is a context manager: while it is active, every tensor an autograd
node saves for backward is recorded (torch.autograd.graph.saved_tensors_hooks) with the
innermost module whose forward was running. Sizes are read afterwards, per storage: a saved
view keeps its whole storage alive (a slice of the fused QKV output keeps all of it), each
storage counts once (for the first module that saved it), parameters do not count, and a
storage released during the forward (Megatron's CheckpointWithoutOutput frees its output with
``untyped_storage().resize_(0)``) counts as what it holds when the context ends: nothing.

This is what decides the activation part of peak memory on the GPU too, with one caveat: the
pieces that run as GPU kernels on CUDA only (RoPE, SwiGLU, RMSNorm: models/triton_kernels.py;
the cross entropy's compiled passes) save what those kernels' autograd functions or inductor's
partitioner keep there, and the CPU's bf16 RMSNorm and grouped-query
SDPA take other code paths (scripts/performance/activation_memory.py lists the differences).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch


@dataclasses.dataclass
class SavedStorage:
    module: str  # the innermost module running when it was first saved ("" = the model itself)
    shape: tuple[int, ...]  # of the (first) tensor saved on it
    dtype: torch.dtype
    storage: torch.UntypedStorage
    nbytes: int = 0  # what the storage holds when the forward ends (0: released)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class SavedTensorLog:
    """Records the tensors saved for backward while active; see the module doc."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.saved: dict[int, SavedStorage] = {}
        self._stack: list[str] = [""]
        self._params = {_storage_key(p) for p in model.parameters()}
        self._handles: list = []
        self._hooks = None

    def __enter__(self) -> SavedTensorLog:
        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._push(name)))
            self._handles.append(module.register_forward_hook(self._pop, always_call=True))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        # Read now: backward may restore a released storage (a recomputed norm output).
        for s in self.saved.values():
            s.nbytes = s.storage.nbytes()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _push(self, name: str):
        def hook(module, args):
            self._stack.append(name)

        return hook

    def _pop(self, module, args, output):
        self._stack.pop()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = _storage_key(t)
            if key not in self._params and key not in self.saved:
                self.saved[key] = SavedStorage(
                    self._stack[-1], tuple(t.shape), t.dtype, t.untyped_storage()
                )
        return t

    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.saved.values())

    def bytes_by_module(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for s in self.saved.values():
            out[s.module] += s.nbytes
        return dict(out)


def layer_part(module: str) -> str | None:
    """``decoder.layers.3.mlp.linear_fc1`` -> ``mlp.linear_fc1``; None outside the layers."""
    parts = module.split(".")
    for i in range(len(parts) - 2):
        if parts[i] == "decoder" and parts[i + 1] == "layers" and parts[i + 2].isdigit():
            return ".".join(parts[i + 3 :]) or "(layer)"
    return None


def outside_layers_bytes(log: SavedTensorLog) -> dict[str, int]:
    """Bytes kept outside the transformer layers (embedding, final norm, output layer, loss)."""
    return {
        m or "(model: loss)": b for m, b in log.bytes_by_module().items() if layer_part(m) is None
    }
