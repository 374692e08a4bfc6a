"""Process-group and device setup, and the CPU backend for Megatron-Core.

Megatron-Core 0.16 assumes CUDA in a handful of places even when every tensor
lives on the CPU. ``enable_cpu_backend`` makes those places work on the CPU; it
is called only when no GPU is visible, and it is the one place in megabridge
that knows about these assumptions. Each one is guarded by a unit test in
tests/unit_tests/runtime/test_cpu_backend.py:

* factory calls with ``device="cuda"`` / ``device=torch.cuda.current_device()``:
  rotary ``inv_freq``, the default causal mask (transformer/utils.py), the
  optimizer's ``found_inf`` / ``_scale`` tensors, ``clip_grads``' norm buffers,
  the pipeline's p2p receive buffers.  Rewritten to the CPU by a
  ``TorchFunctionMode``.
* ``param.type() == "torch.cuda.FloatTensor"`` checks (clip_grads, the
  Float16 optimizer's parameter sort): ``Tensor.type()`` answers with the CUDA
  type name of the same dtype.
* ``tensor.cuda()``: a no-op.
* the RNG tracker (tensor_parallel/random.py) reads and writes the CUDA
  generator through ``torch.cuda.get_rng_state`` / ``manual_seed`` and its own
  ``_get_cuda_rng_state`` / ``_set_cuda_rng_state``: routed to the CPU
  generator, which is the one that CPU kernels draw from.
* ``torch.cuda.current_device`` / ``synchronize``: answer 0 / do nothing.
* CUDA streams and events (the MoE all-to-all token dispatcher copies its
  split sizes to the host on a side stream and waits on an event): CPU work is
  synchronous, so ``torch.cuda.Stream`` / ``Event`` / ``stream()`` /
  ``current_stream()`` become no-op stand-ins.
* the same dispatcher turns its all-to-all split sizes into numpy arrays only
  when they are CUDA tensors (``moe_utils.maybe_move_tensor_to_cpu``); CPU
  tensors stay tensors, which gloo's ``all_to_all_single`` rejects. On the CPU
  they are converted too.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from megabridge.errors import ConfigError

log = logging.getLogger(__name__)

_CPU = torch.device("cpu")
# Tensor.type() names megatron-core compares against, by dtype.
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, int):  # torch.cuda.current_device() style
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class CudaToCpuMode(TorchFunctionMode):
    """Runs code written for CUDA tensors on the CPU (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _CUDA_TYPE_NAMES.get(args[0].dtype, func(*args))
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _CpuStream:
    """A CUDA stream or event on the CPU, where all work is already in order: no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> _CpuStream:
        return _CpuStream()

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_DEFAULT_STREAM = _CpuStream()


def _host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
    """moe_utils.maybe_move_tensor_to_cpu for tensors that are on the host already."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


_cpu_backend_enabled = False


class _DropRngContextWarning(logging.Filter):
    # On the CPU the "CUDA" generator the tracker forks *is* the CPU generator,
    # so megatron's "CPU RNG state changed within GPU RNG context" warning fires
    # on every forked weight init; it carries no information here.
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def enable_cpu_backend() -> None:
    """Let Megatron-Core run on the CPU. Idempotent; never call it with a GPU."""
    global _cpu_backend_enabled
    if _cpu_backend_enabled:
        return
    if torch.cuda.is_available():
        raise RuntimeError("enable_cpu_backend() is only for machines without a GPU")
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.moe import token_dispatcher

    CudaToCpuMode().__enter__()  # stays on for the life of the process
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = torch.manual_seed
    torch.cuda.Stream = torch.cuda.Event = _CpuStream
    torch.cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    token_dispatcher.maybe_move_tensor_to_cpu = _host_copy
    mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )
    logging.getLogger(mcore_random.__name__).addFilter(_DropRngContextWarning())
    _cpu_backend_enabled = True


@dataclass(frozen=True)
class Runtime:
    """Where this process runs and how it talks to the others."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def init_distributed(timeout_minutes: int = 10) -> Runtime:
    """Initialise torch.distributed from the launcher's environment (or as a single process).

    With CUDA: NCCL, one GPU per local rank. Without: gloo, and the CPU backend.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device, backend = torch.device("cuda", torch.cuda.current_device()), "nccl"
    else:
        enable_cpu_backend()
        device, backend = _CPU, "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "MASTER_ADDR" in os.environ:  # a launcher (torchrun, srun) set up the rendezvous
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        else:  # no launcher: a group of one, in memory (no port to race for, no env to leak)
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    return Runtime(rank, world_size, local_rank, device, backend)


def init_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    timeout_minutes: int = 10,
    expert_tensor_parallel_size: int | None = None,
) -> None:
    """Megatron-Core's parallel state for the given layout (torch.distributed must be up).

    ``expert_tensor_parallel_size``: None is Megatron-Core's default, the TP size
    (models/config.py expert_tensor_parallel_size says which models differ)."""
    from megatron.core import parallel_state

    world_size = dist.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size x "
            f"pipeline_model_parallel_size = {model_parallel}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )


def seed_everything(seed: int) -> None:
    """Seed Python, torch and megatron-core's RNG tracker (after the parallel state is up)."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
