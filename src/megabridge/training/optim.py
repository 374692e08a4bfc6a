"""Megatron-Core optimizer, LR schedule and DDP wrapping from our config."""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from megabridge.models.provider import use_bf16
from megabridge.models.triton_kernels import adamw_with_copies, join_halves, runs_on, split_halves
from megabridge.training.config import ConfigContainer


def wrap_ddp(cfg: ConfigContainer, model_chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.dist.overlap_grad_reduce,
        overlap_param_gather=cfg.dist.overlap_param_gather,
        use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
        average_in_collective=False,  # per-token loss: finalize_model_grads divides by tokens
    )
    wrapped = []
    for i, chunk in enumerate(model_chunks):
        wrapped.append(
            DistributedDataParallel(
                config=chunk.config,
                ddp_config=ddp_config,
                module=chunk,
                # Bucketing is off for all but the first chunk, as Megatron-LM does.
                disable_bucketing=i > 0,
            )
        )
    if cfg.model.gradient_accumulation_fusion:
        # compiled layers' backward is traced once: first writes need each call's Python
        first_writes = FIRST_WRITES and not cfg.model.compile_layers
        accumulate_wgrad_in_main_grad(wrapped, first_writes=first_writes)
    return wrapped


# FirstWrites is off until it has run on a GPU: gpu_smoke.sh's optimizer_fusions path checks
# it against the zeroed buffer on CUDA, and train_throughput.py measures what it saves
# (scripts/performance/NOTES.md, 2026-12-05, seventh session). The CPU tests switch it on.
FIRST_WRITES = False


def accumulate_wgrad_in_main_grad(
    model_chunks: list[torch.nn.Module], first_writes: bool = True
) -> None:
    """Megatron-Core's gradient_accumulation_fusion on the GPU without Apex: the weight-gradient
    GEMM of each Megatron linear adds into DDP's fp32 ``main_grad`` itself.

    Without it, each linear returns a bf16 weight gradient and DDP's hook adds it into the
    fp32 buffer: a bf16 write, then a mixed-dtype add per parameter (one kernel each). Megatron's
    fused path calls Apex's fused_weight_gradient_mlp_cuda, which is not on PyPI;
    ``_FP32Accumulate`` does the same with torch.addmm(out_dtype=float32), one cuBLAS GEMM that
    reads and writes main_grad (fp32 accumulation throughout, where the unfused path rounds each
    weight gradient to bf16 first). Switched on per layer after DDP has made ``main_grad``:
    Megatron's linears read ``gradient_accumulation_fusion`` at each call, so layers that DDP does
    not own (no main_grad), frozen ones and CPU runs keep the unfused path.

    With ``first_writes``, the weights whose gradients the GEMM alone writes are also spared
    DDP's zeroing (``FirstWrites``).
    """
    from megatron.core.tensor_parallel import layers

    if not _fusion_runs():
        return
    layers.fused_weight_gradient_mlp_cuda = _FP32Accumulate
    for chunk in model_chunks:
        switched = []
        for module in chunk.modules():
            if not isinstance(module, layers.ColumnParallelLinear | layers.RowParallelLinear):
                continue
            weight = getattr(module, "weight", None)
            owned = weight is not None and weight.requires_grad and hasattr(weight, "main_grad")
            if owned and weight.main_grad.dtype == torch.float32:
                module.gradient_accumulation_fusion = True
                switched.append(weight)
        if first_writes and switched and _first_write_works():
            FirstWrites.attach(chunk, switched)
    # A tied output layer has no weight of its own (the embedding's is passed in at each
    # call): it keeps the unfused path.


def _fusion_runs() -> bool:
    return torch.cuda.is_available() and _fp32_accumulate_works()


class FirstWrites:
    """DDP zeroes its whole fp32 gradient buffer before each step (a pass over every
    gradient, ~1 ms for 1.1B parameters on an H200), and each fused weight-gradient GEMM then
    reads the zeros it adds to (fp32, ~2 ms a step). Here a DDP chunk's buffers zero only the
    gradients that something else adds to; a fused weight's main_grad is written by its first
    weight-gradient GEMM of the step (beta 0: nothing read) and added to by the next ones
    (further micro-batches).

    Which weights those are is learned, not assumed: the first step zeroes everything as
    upstream does, and its gradients' finalization (``finalize``) keeps the weights whose
    main_grad the fused GEMM wrote (``_FP32Accumulate`` marks it) and whose linear told DDP's
    hook so (``grad_added_to_main_grad``). An FP8 linear, a weight that got no gradient in
    that step, or one whose gradient also came another way stays zeroed. A kept weight that
    gets no gradient in a later step (an expert no token reached) is zeroed when the step's
    gradients are finalized, before anything reads them.
    """

    def __init__(self, chunk, candidates: list[torch.nn.Parameter]):
        self.candidates = candidates
        self.learned = False
        self.kept: list[torch.Tensor] = []  # the kept weights' main_grads
        # a buffer's id -> (the main_grads its reset zeroes, those it leaves to the GEMMs)
        self.plan: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.buffers = chunk.buffers + chunk.expert_parallel_buffers
        for buffer in self.buffers:
            buffer.reset = functools.partial(self._reset, buffer)

    @classmethod
    def attach(cls, chunk, candidates: list[torch.nn.Parameter]) -> None:
        if getattr(chunk.ddp_config, "reuse_grad_buf_for_mxfp8_param_ag", False):
            return  # that buffer holds parameters between steps: it must be zeroed whole
        chunk.first_writes = cls(chunk, candidates)

    def _reset(self, buffer) -> None:
        zeroed, left = self.plan.get(id(buffer), (None, None))
        if not left:
            buffer.grad_data.zero_()  # upstream's reset
            return
        if zeroed:
            torch._foreach_zero_(zeroed)
        for grad in left:
            grad.first_write_pending = True

    def finalize(self) -> None:
        """Before the step's gradients are read: after the first step, learn the weights to
        keep; after later ones, zero the kept main_grads no GEMM wrote."""
        if not self.learned:
            self.learned = True
            kept = {
                id(p) for p in self.candidates
                if getattr(p.main_grad, "written_by_gemm", False)
                and getattr(p, "grad_added_to_main_grad", False)
            }  # fmt: skip
            for buffer in self.buffers:
                grads = [(id(p) in kept, p.main_grad) for p in buffer.params]
                left = [g for is_kept, g in grads if is_kept]
                self.plan[id(buffer)] = ([g for is_kept, g in grads if not is_kept], left)
                self.kept += left
            return
        unwritten = [g for g in self.kept if getattr(g, "first_write_pending", False)]
        if unwritten:
            torch._foreach_zero_(unwritten)
        for grad in unwritten:
            grad.first_write_pending = False

    @staticmethod
    def finalize_all(model_chunks) -> None:
        for chunk in model_chunks:
            writes = getattr(chunk, "first_writes", None)
            if writes is not None:
                writes.finalize()


class _FP32Accumulate:
    """The function of Apex's fused_weight_gradient_mlp_cuda that Megatron-Core calls for an
    fp32 main_grad (the only kind switched on here): main_grad += grad_output^T @ input,
    input [tokens, in], grad_output [tokens, out]."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input, grad_output, main_grad):
        # FirstWrites: a main_grad not zeroed for this step is written, not added to
        first = getattr(main_grad, "first_write_pending", False)
        _FP32Accumulate.gemm(main_grad, grad_output, total_input, beta=0.0 if first else 1.0)
        main_grad.first_write_pending, main_grad.written_by_gemm = False, True

    @staticmethod
    def gemm(out, grad_output, total_input, beta: float) -> None:
        """out = beta * out + grad_output^T @ input in fp32 (beta 0: out is not read)."""
        torch.addmm(out, grad_output.t(), total_input, beta=beta, out_dtype=torch.float32, out=out)


@functools.cache
def _first_write_works() -> bool:
    """Whether this torch's addmm with beta 0 ignores what its fp32 output held (NaN
    included), as FirstWrites needs; checked once."""
    return _gemm_agrees(beta=0.0, held=float("nan"))


@functools.cache
def _fp32_accumulate_works() -> bool:
    """Whether this torch's CUDA addmm takes bf16 operands into an fp32 output in place
    (out_dtype arrived in torch 2.8), checked once against an fp32 reference."""
    return _gemm_agrees(beta=1.0, held=1.0)


def _gemm_agrees(beta: float, held: float) -> bool:
    """_FP32Accumulate.gemm with ``beta`` on a CUDA fp32 output holding ``held``, against
    the fp32 reference (beta * held + the product; beta 0: the product alone); False where
    this torch refuses the call."""
    try:
        g = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(64, 48, device="cuda", dtype=torch.bfloat16)
        out = torch.full((32, 48), held, device="cuda")
        expected = g.t().float() @ x.float() + (beta * held if beta else 0.0)
        _FP32Accumulate.gemm(out, g, x, beta=beta)
        return bool(torch.allclose(out, expected, rtol=1e-4, atol=1e-3))
    except (RuntimeError, TypeError):
        return False


def build_optimizer(cfg: ConfigContainer, model_chunks: list[torch.nn.Module]):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = cfg.optimizer
    opt_config = OptimizerConfig(
        optimizer=o.optimizer,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=use_bf16(cfg.model),
        params_dtype=torch.bfloat16 if use_bf16(cfg.model) else torch.float32,
        use_distributed_optimizer=o.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, model_chunks)
    _use_fused_adam(optimizer)
    _batch_main_to_model_copy(optimizer)
    _write_copies_in_adam(optimizer, remainders=o.store_param_remainders)
    return optimizer


def _use_fused_adam(optimizer) -> None:
    """Without TE/Apex, Megatron-Core falls back to torch.optim.AdamW with its default
    multi-kernel (foreach) path; switch its param groups to torch's fused kernel. On the GPU
    it is one kernel per step; the CPU has the same fused kernel, so CPU runs (the tests) take
    the GPU's optimizer path too, the token division and clipping inside it included."""
    for opt in inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.AdamW):
            for group in inner.param_groups:
                group["fused"], group["foreach"] = True, False


def _batch_main_to_model_copy(optimizer) -> None:
    """After each step Megatron-Core's bf16 optimizer casts its fp32 main params into the
    bf16 model params one tensor at a time (optimizer.py _multi_tensor_copy_this_to_that: its
    overflow_buf is None for bf16, with or without Apex): a kernel per parameter. The same
    casts through torch._foreach_copy_, in a few multi-tensor launches."""
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for opt in inner_optimizers(optimizer):
        if isinstance(opt, Float16OptimizerWithFloat16Params) and not opt.is_stub_optimizer:
            opt._copy_main_params_to_model_params = functools.partial(_copy_main_to_model, opt)


def _copy_main_to_model(opt) -> None:
    if hasattr(opt, _REMAINDERS):  # the bf16 weights are the main ones' high halves
        return
    if getattr(opt, _COPIED, False):  # the step wrote them (_write_copies_in_adam)
        setattr(opt, _COPIED, False)
        return
    model_data, main_data = opt._get_model_and_main_params_data_float16()
    if model_data:
        torch._foreach_copy_(model_data, main_data)


def _write_copies_in_adam(optimizer, remainders: bool = False) -> None:
    """On the GPU, the bf16 optimizer's AdamW step (triton_kernels.adamw_with_copies) writes
    each bf16 model weight as it updates the fp32 one: the cast after the step (a read of
    every fp32 weight and a write of every bf16 one) goes, and so does fused AdamW's write-back
    of the gradients it divided. Only where _use_fused_adam made the inner AdamW fused (the
    kernel reads grad_scale / found_inf as torch's does) and its parameters are on CUDA.
    With ``remainders`` (optimizer.store_param_remainders) the fp32 main weights are held as
    their bf16 model weights and 16-bit remainders (_keep_remainders)."""
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for opt in inner_optimizers(optimizer):
        if not (isinstance(opt, Float16OptimizerWithFloat16Params) and _fused_adamw(opt)):
            continue
        groups = opt.optimizer.param_groups
        if any(group["amsgrad"] or group["maximize"] for group in groups):
            continue  # torch's fused AdamW keeps those
        params = [p for group in groups for p in group["params"]]
        if not (params and all(_adam_kernel_runs_on(p) for p in params)):
            continue
        copies = _models_by_main(opt)
        rems = _keep_remainders(opt) if remainders else None
        opt.optimizer.step = functools.partial(_step_writing_copies, opt, copies, rems)


def _models_by_main(opt) -> dict[int, torch.Tensor]:
    """A bf16 optimizer's model weights by id of their fp32 main weights."""
    return {
        id(main): model
        for models, mains in zip(opt.float16_groups, opt.fp32_from_float16_groups, strict=True)
        for model, main in zip(models, mains, strict=True)
    }


def _adam_kernel_runs_on(p: torch.Tensor) -> bool:
    """Where the Triton AdamW steps: CUDA (or, in a process running Triton's interpreter,
    the CPU: the tests train and checkpoint its remainders there)."""
    return p.dtype == torch.float32 and p.is_contiguous() and runs_on(p)


def _step_writing_copies(opt, copies: dict, remainders: dict | None, closure=None) -> None:
    if closure is not None:  # torch's step signature; Megatron-Core never passes one
        raise NotImplementedError(
            "AdamW writing the bf16 weights takes no closure (not supported yet)"
        )

    adamw_with_copies(opt.optimizer, copies, remainders)
    setattr(opt, _COPIED, True)


# Set on a bf16 optimizer whose step wrote the model's bf16 weights (_write_copies_in_adam):
# the copy Megatron-Core calls next has nothing left to do.
_COPIED = "megabridge_copies_written"


def _keep_remainders(opt) -> dict:
    """Hold each fp32 main weight of Megatron-Core's bf16 optimizer ``opt`` as its bf16
    model weight (the high half, rounded) and an int16 remainder (the low half), as
    Transformer Engine's FusedAdam does with store_param_remainders: 4 bytes a parameter
    where a separate fp32 copy takes 6, the same fp32 values in the AdamW step.

    The main parameters stay the optimizer's keys (their shapes, attributes and gradients
    as before) but lose their storage: each becomes a NaN broadcast to its shape, so a read
    that this module did not route is loud. Upstream's reads are routed here: state_dict (so
    the checkpoint's optimizer.state.fp32_param holds the fp32 values), load_state_dict (the
    loaded fp32 values split into the halves) and the model-to-main copy of
    reload_model_params. Returns the remainders by id of the main parameter."""
    rems = {}
    with torch.no_grad():
        for models, mains in zip(opt.float16_groups, opt.fp32_from_float16_groups, strict=True):
            for model, main in zip(models, mains, strict=True):
                rem = torch.empty(main.shape, dtype=torch.int16, device=main.device)
                split_halves(main, model, rem)
                rems[id(main)] = rem
                main.data = torch.full((), math.nan, device=main.device).expand(main.shape)
    setattr(opt, _REMAINDERS, rems)
    opt.state_dict = functools.partial(_state_dict_from_halves, opt, opt.state_dict)
    opt.load_state_dict = functools.partial(_load_state_dict_into_halves, opt, opt.load_state_dict)
    opt._copy_model_params_to_main_params = functools.partial(_model_to_main_halves, opt)
    return rems


# Set on a bf16 optimizer whose fp32 main weights are held as halves (_keep_remainders).
_REMAINDERS = "megabridge_param_remainders"


def main_weights(optimizer) -> list[torch.Tensor]:
    """Copies of the fp32 main weights, in get_parameters() order; those held as halves
    (optimizer.store_param_remainders) put together."""
    weights = []
    for opt in inner_optimizers(optimizer):
        rems = getattr(opt, _REMAINDERS, {})
        models = _models_by_main(opt) if rems else {}
        for p in opt.get_parameters():
            held = id(p) in rems
            weights.append(join_halves(models[id(p)], rems[id(p)]) if held else p.detach().clone())
    return weights


def _main_values(opt) -> list[list[torch.Tensor]]:
    """The fp32 main weights of a _keep_remainders optimizer, put together (new tensors)."""
    rems = getattr(opt, _REMAINDERS)
    return [
        [join_halves(model, rems[id(main)]) for model, main in zip(models, mains, strict=True)]
        for models, mains in zip(opt.float16_groups, opt.fp32_from_float16_groups, strict=True)
    ]


def _state_dict_from_halves(opt, upstream, *args, **kwargs) -> dict:
    """Upstream's state_dict (sharded_state_dict builds on it) with the fp32 main weights as
    tensors of their own: what is saved, or the buffers a checkpoint is loaded into."""
    mains = opt.fp32_from_float16_groups
    opt.fp32_from_float16_groups = _main_values(opt)
    try:
        return upstream(*args, **kwargs)
    finally:
        opt.fp32_from_float16_groups = mains


def _load_state_dict_into_halves(opt, upstream, state_dict: dict) -> None:
    """Upstream's load_state_dict, the saved fp32 main weights split into the halves."""
    key = "fp32_from_fp16_params" if "fp32_from_fp16_params" in state_dict else "fp32_from_fp16"
    saved = state_dict[key]
    if len(saved) != len(opt.fp32_from_float16_groups):
        raise ValueError("the checkpoint's fp32 main weights do not match the optimizer's groups")
    upstream({**state_dict, key: []})  # upstream copies the main weights group by group
    rems = getattr(opt, _REMAINDERS)
    with torch.no_grad():
        for models, mains, values in zip(
            opt.float16_groups, opt.fp32_from_float16_groups, saved, strict=True
        ):
            for model, main, value in zip(models, mains, values, strict=True):
                split_halves(value.to(model.device), model, rems[id(main)])


def _model_to_main_halves(opt, state_dict=None) -> None:
    """reload_model_params: the main weights become the model's bf16 values (remainder 0)."""
    if state_dict is not None:
        raise NotImplementedError("main weights from a state dict (not supported yet, as upstream)")
    for rem in getattr(opt, _REMAINDERS).values():
        rem.zero_()


def inner_optimizers(optimizer) -> list:
    """The Megatron-Core optimizers inside ``optimizer``: a ChainedOptimizer's, or itself."""
    return getattr(optimizer, "chained_optimizers", [optimizer])


def build_scheduler(cfg: ConfigContainer, optimizer):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    gbs = cfg.train.global_batch_size
    decay_iters = cfg.scheduler.lr_decay_iters or cfg.train.train_iters
    warmup = min(cfg.scheduler.lr_warmup_iters, decay_iters)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=cfg.scheduler.lr_warmup_init,
        max_lr=cfg.optimizer.lr,
        min_lr=cfg.optimizer.min_lr,
        # Counted in samples, as Megatron-LM does: step(increment=global_batch_size).
        lr_warmup_steps=warmup * gbs,
        lr_decay_steps=max(decay_iters * gbs, warmup * gbs + 1),
        lr_decay_style=cfg.scheduler.lr_decay_style,
        start_wd=cfg.optimizer.weight_decay,
        end_wd=cfg.optimizer.weight_decay,
        wd_incr_steps=decay_iters * gbs,
        wd_incr_style="constant",
        wsd_decay_steps=max(1, decay_iters // 10) * gbs,
        lr_wsd_decay_style="linear",
    )


def grad_norm_before_step(optimizer) -> float:
    """The global gradient norm (NaN where a loss scaler found inf), gradients made ready.

    A collective: every rank takes the same step-or-skip decision from it. Reading it is
    the step's one wait for the GPU. (With fused AdamW, step_deciding_on_device takes the
    decision without that wait.)
    """
    if optimizer.prepare_grads():  # a loss scaler found inf
        return float("nan")
    with _l2_norm_with_one_host_copy():
        return float(optimizer.get_grad_norm())


@contextlib.contextmanager
def _l2_norm_with_one_host_copy():
    """Megatron-Core's norm without Apex / TE (utils.local_multi_tensor_l2_norm, which
    clip_grads.py takes as l2_norm_impl) reads the per-parameter norms back with
    torch.tensor(list of device scalars): a blocking copy per parameter, the GPU idle between
    them. While active, the same norms come back in one copy and are reduced on the host as
    before, so the result is the same to the bit."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is not utils.local_multi_tensor_l2_norm:  # Apex / TE kernels
        yield
        return
    clip_grads.l2_norm_impl = _l2_norm_one_host_copy
    try:
        yield
    finally:
        clip_grads.l2_norm_impl = utils.local_multi_tensor_l2_norm


def _l2_norm_one_host_copy(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """utils.local_multi_tensor_l2_norm, but the [lists, tensors] norms cross in one copy."""
    norms = torch.stack([torch.stack([torch.norm(t) for t in ts]) for ts in tensor_lists])
    total = torch.norm(norms.cpu())  # on the host, as upstream's torch.tensor(norms) is
    return torch.tensor([float(total)], dtype=torch.float, device="cuda"), None


def step_if_finite(optimizer, grad_norm: float) -> bool:
    """Clip to the norm and step, unless the norm is not finite.

    Megatron-Core's optimizer.step() applies a NaN/Inf gradient to the weights
    when there is no loss scaler (bf16 / fp32): the update is skipped here instead.
    """
    if not math.isfinite(grad_norm):
        return False
    for opt in inner_optimizers(optimizer):
        if opt.config.clip_grad > 0.0:
            _clip_grads(opt.get_parameters(), opt.config.clip_grad, grad_norm)
    return bool(optimizer.step_with_ready_grads())


def decides_on_device(optimizer) -> bool:
    """Whether this step's gradients were left as sums for fused AdamW to divide
    (_finalize_model_grads kept the token count), so step_deciding_on_device takes it."""
    return getattr(optimizer, _TOKENS, None) is not None


@torch.no_grad()
def step_deciding_on_device(
    optimizer, loss_total: torch.Tensor
) -> tuple[float, float, float, bool]:
    """Step, or skip a step whose loss or gradient norm is not finite (or whose batch has no
    token to learn from), without the host waiting for the GPU first. Returns (loss sum,
    tokens, gradient norm, stepped).

    The decision and the scale are device tensors that torch's fused AdamW reads in its
    kernel: ``found_inf`` (the step is skipped, the step counts stay) and ``grad_scale``
    (each gradient, a sum over the batch's tokens, is divided by the token count and by the
    clipping coefficient of clip_grads.clip_grad_by_total_norm_fp32 as it is read). The
    values come back to the host after Adam is queued: the host then waits only for the norm,
    while the GPU runs Adam, and the next step's kernels follow Adam's without a gap. The
    gradients' per-token norm is the norm of the sums divided by the count (to rounding).
    """
    tokens = getattr(optimizer, _TOKENS)
    setattr(optimizer, _TOKENS, None)
    optimizer.prepare_grads()  # bf16 / fp32 have no loss scaler: the main grads made ready
    count = tokens.to(torch.float32)
    per_token = torch.where(count > 0, 1.0 / count.clamp(min=1.0), 1.0)
    norm = _grad_norm_squared(optimizer, count.device).sqrt() * per_token
    # as the host's check of the mean loss: not finite, or no token in the batch
    skip = ~(torch.isfinite(norm) & torch.isfinite(loss_total[0]) & (loss_total[1] > 0))
    inners = []
    for opt in inner_optimizers(optimizer):
        factor = per_token
        if opt.config.clip_grad > 0.0:
            factor = factor * _clip_coeff(opt.config.clip_grad, norm).clamp(max=1.0)
        opt.optimizer.grad_scale = 1.0 / factor
        opt.optimizer.found_inf = skip.to(torch.float32)
        inners.append(opt.optimizer)
    values = torch.stack([loss_total[0], loss_total[1], norm.double(), skip.double()])
    values = values.to("cpu", non_blocking=True)  # to pinned memory, after the norm
    ready = torch.cuda.Event() if norm.is_cuda else None
    if ready is not None:
        ready.record()
    try:
        optimizer.step_with_ready_grads()
    finally:
        for inner in inners:
            inner.grad_scale = inner.found_inf = None
    if ready is not None:
        ready.synchronize()  # the norm is done; Adam may still run
    loss_sum, total_tokens, grad_norm, skipped = values.tolist()
    return loss_sum, total_tokens, grad_norm, not skipped


def _grad_norm_squared(optimizer, device: torch.device) -> torch.Tensor:
    """The squared global gradient norm, on the device: the gradients Megatron-Core's
    get_grad_norm takes (get_main_grads_for_grad_norm), summed over each optimizer's
    get_grad_stats_parallel_group as there. Upstream's get_grad_norm_fp32 ends by reading
    the value on the host; this is the same sum kept where the step's kernels read it."""
    total = None
    for opt in inner_optimizers(optimizer):
        grads = opt.get_main_grads_for_grad_norm()
        if grads:
            squared = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) ** 2
        else:
            squared = torch.zeros((), dtype=torch.float32, device=device)
        torch.distributed.all_reduce(squared, group=opt.get_grad_stats_parallel_group())
        total = squared if total is None else total + squared
    return total


# The optimizer's attribute for a step's global token count (a device tensor) when the
# gradients are left as sums for fused AdamW to divide (see _finalize_model_grads).
_TOKENS = "megabridge_global_tokens"


def _adam_divides(optimizer) -> bool:
    """Whether every optimizer inside is torch's fused AdamW (_use_fused_adam makes it so
    on the GPU and the CPU; not for another optimizer or a stub), which divides gradients by
    its ``grad_scale`` tensor in its own kernel."""
    return all(_fused_adamw(opt) for opt in inner_optimizers(optimizer))


def _fused_adamw(opt) -> bool:
    """Whether one Megatron-Core optimizer steps with torch's fused AdamW (not a stub)."""
    inner = getattr(opt, "optimizer", None)
    if not isinstance(inner, torch.optim.AdamW) or getattr(opt, "is_stub_optimizer", False):
        return False
    return all(group.get("fused") for group in inner.param_groups)


def _finalize_model_grads(optimizer, model, num_tokens=None, **kwargs) -> None:
    """Megatron-Core's finalize_model_grads; with fused AdamW, without its last part.

    For the per-token loss it broadcasts the global batch's token count from the last pipeline
    stage, sums it over data parallelism, waits for it on the host (``num_tokens > 0``) and
    divides the whole fp32 gradient buffer by it: a pass over every gradient. With fused
    AdamW the count is kept instead (the same broadcast and sum, no wait), and the step divides
    by it inside Adam's kernel (step_deciding_on_device). For any other optimizer this is
    upstream's function unchanged.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel.utils import get_pp_last_rank

    FirstWrites.finalize_all(model)  # before anything reads the gradients
    if num_tokens is None or not _adam_divides(optimizer):
        finalize_model_grads(model, num_tokens, **kwargs)
        return
    finalize_model_grads(model, None, **kwargs)
    groups = kwargs.get("pg_collection")
    pp = groups.pp if groups is not None else ps.get_pipeline_model_parallel_group()
    dp_cp = (
        groups.dp_cp
        if groups is not None
        else ps.get_data_parallel_group(with_context_parallel=True)
    )
    torch.distributed.broadcast(num_tokens, src=get_pp_last_rank(pp), group=pp)
    torch.distributed.all_reduce(num_tokens, group=dp_cp)
    setattr(optimizer, _TOKENS, num_tokens)


def _clip_grads(params, max_norm: float, total_norm: float) -> None:
    """clip_grads.clip_grad_by_total_norm_fp32: the same coefficient and the same fp32
    products, in place. Without Apex / TE its scaling (utils.local_multi_tensor_scale) writes
    grad * coeff to a temporary and copies it back: two kernels per parameter."""
    clip_coeff = _clip_coeff(max_norm, total_norm)
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _clip_coeff(max_norm: float, total_norm):
    """clip_grads.clip_grad_by_total_norm_fp32's coefficient (clipping where it is below 1);
    the norm a float or a device tensor."""
    return max_norm / (total_norm + 1.0e-6)


def connect_to_schedules(cfg: ConfigContainer, model_chunks, optimizer) -> None:
    """Tell Megatron-Core's pipeline schedules how to sync, finalize and scale grads."""
    from megatron.core.utils import get_model_config

    config = get_model_config(model_chunks[0])
    # All-reduce over DP, tied embeddings over PP, then divide by the token count (with
    # fused AdamW: inside the optimizer's step).
    config.finalize_model_grads_func = functools.partial(_finalize_model_grads, optimizer)
    config.grad_scale_func = optimizer.scale_loss
    no_sync = [m.no_sync for m in model_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if cfg.dist.overlap_grad_reduce:
        sync = [m.start_grad_sync for m in model_chunks]
        config.grad_sync_func = sync[0] if len(sync) == 1 else sync
    if cfg.dist.overlap_param_gather and cfg.optimizer.use_distributed_optimizer:
        param_sync = [m.start_param_sync for m in model_chunks]
        config.param_sync_func = param_sync[0] if len(param_sync) == 1 else param_sync
