"""The GPU smoke suite: every user-facing training path, run on CUDA, in a few minutes.

    bash scripts/gpu_smoke.sh [--jobs 4] [--only sft_packed lora_export ...] [--logs DIR]

The CPU tests never run what a GPU runs differently (compiled RoPE / SwiGLU / cross
entropy, flash and varlen attention, bf16, NCCL), so every change to models, training,
data or PEFT runs this on a GPU machine too. Each path runs the real command line in
fresh processes on small models, checks what it wrote (losses fall, exports reload in
transformers and peft, resumed losses equal the uninterrupted ones, ...), and prints one
line: PASS or FAIL, with its numbers. Exit code 1 if any path failed. Each path's full
output is in its log file under --logs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.data_helpers: the offline tokenizer and chat corpus

PATHS: dict[str, Callable[[Smoke], str]] = {}


def path(fn):
    """Register a smoke path; it returns a one-line summary or raises Failure."""
    PATHS[fn.__name__] = fn
    return fn


class Failure(Exception):
    pass


class Smoke:
    def __init__(self, work: Path, logs: Path):
        self.work, self.logs = work, logs

    def run(self, log: str, args: list[str], timeout: int = 600, env: dict | None = None) -> str:
        """``python args...`` in the repository; returns its output, also appended to
        logs/<log>.log. ``env``: variables to set for it."""
        try:
            result = subprocess.run(
                [sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, timeout=timeout, text=True,
                env={**os.environ, **(env or {})},
            )  # fmt: skip
            output, code = result.stdout, result.returncode
        except subprocess.TimeoutExpired as e:
            output, code = (e.output or b"").decode(errors="replace"), f"timeout {timeout} s"
        with open(self.logs / f"{log}.log", "a") as f:
            f.write(f"$ python {' '.join(args)}\n{output}\n")
        if code != 0:
            last = [line for line in output.splitlines() if line.strip()][-1:] or ["(no output)"]
            raise Failure(f"{args[0]} {args[1] if len(args) > 1 else ''}: exit {code}: "
                          f"{last[0][:300]}")  # fmt: skip
        return output

    def pytest(self, log: str, *args: str, passed: tuple[str, ...] = ()) -> str:
        """pytest -v on the GPU (tests/conftest.py hides it unless CUDA_VISIBLE_DEVICES says
        otherwise); each of ``passed`` (test names) must be in its output as PASSED."""
        gpu = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES") or "0"}
        output = self.run(log, ["-m", "pytest", "-v", "-p", "no:cacheprovider", *args], env=gpu)
        for case in passed:
            if f"{case} PASSED" not in output:
                raise Failure(f"not in the pytest output: {case} PASSED")
        return output

    def megabridge(self, log: str, *args: str, timeout: int = 600) -> str:
        """The ``megabridge`` command; returns its output."""
        return self.run(log, ["-m", "megabridge", *args], timeout)

    def train(self, log: str, command: str, recipe: str, folder: Path, *overrides: str) -> list:
        """megabridge train/finetune into ``folder``; returns its metrics.jsonl records."""
        self.megabridge(
            log, command, "--recipe", recipe, f"checkpoint.save={folder / 'ckpt'}",
            f"logger.log_dir={folder / 'logs'}", "logger.tensorboard=false", *overrides,
        )  # fmt: skip
        return metrics(folder / "logs")

    def hf_llama(self) -> Path:
        """A small random Llama (bf16) with a chat tokenizer and a chat corpus beside it."""
        folder = self.work / "hf_llama"
        if not folder.exists():
            raise Failure("setup did not make the HF model")
        return folder


def metrics(log_dir: Path) -> list[dict]:
    lines = (log_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def losses(records: list[dict]) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in records if "loss" in r}


def falling(records: list[dict], what: str) -> str:
    """Check that the training loss is finite everywhere and ends lower than it starts."""
    by_iter = losses(records)
    if not by_iter:
        raise Failure(f"{what}: no losses logged")
    values = list(by_iter.values())
    if not all(math.isfinite(v) for v in values):
        raise Failure(f"{what}: non-finite loss {values}")
    first, last = values[0], values[-1]
    if not last < first:
        raise Failure(f"{what}: loss did not fall ({first:.3f} -> {last:.3f})")
    return f"loss {first:.3f} -> {last:.3f} in {len(values)} steps"


# ------------------------------------------------------------------------------ setup


def make_hf_llama(work: Path) -> None:
    """The HF model the fine-tuning paths start from: 4 layers, GQA, head dim 32, bf16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.data_helpers import chat_corpus, make_tokenizer

    folder = work / "hf_llama"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(folder))
    make_tokenizer(folder)
    chat_corpus(work / "chat.jsonl", 256)


# ------------------------------------------------------------------------------ paths


@path
def quick_run(s: Smoke) -> str:
    """The README's first command, as it is (the default recipe)."""
    folder = s.work / "quick"
    s.megabridge("quick_run", "train", f"checkpoint.save={folder / 'ckpt'}",
                 f"logger.log_dir={folder / 'logs'}")  # fmt: skip
    return falling(metrics(folder / "logs"), "quick run")


def _pretrain(s: Smoke, recipe: str) -> str:
    records = s.train(recipe, "train", recipe, s.work / recipe, "train.train_iters=10")
    return falling(records, recipe)


@path
def pretrain_llama(s: Smoke) -> str:
    return _pretrain(s, "llama_tiny_pretrain_config")


@path
def pretrain_moe(s: Smoke) -> str:
    """MoE (EP=1): Qwen3-MoE's softmax routing, then DeepSeek-V3's MLA and sigmoid routing."""
    qwen = _pretrain(s, "qwen3_moe_tiny_pretrain_config")
    deepseek = _pretrain(s, "deepseek_v3_tiny_pretrain_config")
    return f"qwen3_moe {qwen}; deepseek_v3 {deepseek}"


@path
def pretrain_gemma(s: Smoke) -> str:
    """Sliding windows, soft-capping and per-layer RoPE (the torch spec's chunked attention)."""
    return _pretrain(s, "gemma3_tiny_pretrain_config")


@path
def pretrain_gpt_oss(s: Smoke) -> str:
    """Attention sinks (chunked attention), YaRN, clamped SwiGLU, experts with biases."""
    return _pretrain(s, "gpt_oss_tiny_pretrain_config")


@path
def pretrain_llama4(s: Smoke) -> str:
    """Llama 4: chunked attention (blocks on SDPA), NoPE layers' query temperature, the QK
    L2 norm, interleaved RoPE, top-1 sigmoid routing on the expert input, shared expert."""
    return _pretrain(s, "llama4_tiny_pretrain_config")


@path
def pretrain_fp8(s: Smoke) -> str:
    """model.fp8 through the command line: tensorwise with SwiGLU recomputed in fc2's FP8
    backward (model.recompute_swiglu=true), then rowwise with the first and last of four
    layers in bf16 (model.first_last_layers_bf16). The one-pass casts' first-use check must
    agree with torch's casts (no fallback warning)."""
    runs = {
        "tensorwise, SwiGLU recomputed": ("model.fp8=tensorwise", "model.recompute_swiglu=true"),
        "rowwise, first/last layers bf16": ("model.fp8=rowwise", "model.num_layers=4",
                                            "model.first_last_layers_bf16=true"),
    }  # fmt: skip
    done = []
    for i, (name, overrides) in enumerate(runs.items()):
        folder = s.work / f"fp8_{i}"
        records = s.train("pretrain_fp8", "train", "llama_tiny_pretrain_config", folder,
                          "train.train_iters=10", *overrides)  # fmt: skip
        done.append(f"{name} {falling(records, name)}")
    if "disagree with torch" in (s.logs / "pretrain_fp8.log").read_text():
        raise Failure("a first-use kernel check disagreed (see pretrain_fp8.log)")
    return "; ".join(done)


SFT = ("llama_tiny_finetune_config", "train.train_iters=12", "train.eval_interval=6",
       "dataset.seq_length=128", "optimizer.lr=3e-3")  # fmt: skip


def _sft(s: Smoke, name: str, *extra: str) -> tuple[Path, list[dict]]:
    hf = s.hf_llama()
    folder = s.work / name
    records = s.train(name, "finetune", SFT[0], folder, f"checkpoint.pretrained_checkpoint={hf}",
                      f"dataset.path={s.work / 'chat.jsonl'}", f"tokenizer.path={hf}",
                      *SFT[1:], *extra)  # fmt: skip
    return folder, records


def _eval_line(records: list[dict]) -> str:
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    if not evals or not all(math.isfinite(e) for e in evals):
        raise Failure(f"eval losses missing or not finite: {evals}")
    return f"eval {' -> '.join(f'{e:.3f}' for e in evals)}"


@path
def sft_packed(s: Smoke) -> str:
    _, records = _sft(s, "sft_packed", "dataset.packed=true", "train.micro_batch_size=1")
    return f"{falling(records, 'packed SFT')}, {_eval_line(records)}"


@path
def sft_padded(s: Smoke) -> str:
    _, records = _sft(s, "sft_padded", "dataset.packed=false", "train.micro_batch_size=4")
    return f"{falling(records, 'padded SFT')}, {_eval_line(records)}"


@path
def packed_equals_padded(s: Smoke) -> str:
    """The unit tests of packed sequences, which add CUDA fp32 and bf16 cases on a GPU."""
    tests = ["tests/unit_tests/data/test_packed_loss.py",
             "tests/unit_tests/models/test_torch_spec.py"]  # fmt: skip
    # the bf16 cases, which exist only where torch sees a GPU, ran and passed
    output = s.pytest("packed_equals_padded", "-k", "packed", *tests, passed=(
        "test_packed_and_padded_losses_match[rope-True-True]",
        "test_packed_attention_does_not_cross_segments[4-cuda-dtype2-0.02]",
        "test_packed_llama4_attention_restarts_chunks_and_temperature_per_segment"
        "[cuda-dtype2-0.02]"))  # fmt: skip
    summary = [line for line in output.splitlines() if re.search(r"\d+ passed", line)]
    return summary[-1].strip("= ") if summary else "passed"


@path
def triton_kernels(s: Smoke) -> str:
    """megabridge's Triton kernels (SwiGLU, RoPE, RMSNorm with the residual add before it,
    AdamW: every bf16 training step of the torch spec runs them; the FP8 cast-transpose of
    model.fp8=tensorwise) against the torch math (AdamW: torch's fused one), forward and
    backward, compiled for this GPU."""
    s.pytest("triton_kernels", "tests/unit_tests/models/test_triton_kernels.py",
             "tests/unit_tests/models/test_residual_norm.py", passed=(
        "test_the_kernels_match_the_torch_math_on_cuda",
        "test_fused_adds_give_the_unfused_loss_and_gradients_bit_for_bit",
        "test_a_model_with_the_swiglu_module_trains_and_saves_like_megatron_s_swiglu",
        "test_attention_with_the_fused_qkv_rope_matches_megatron_s_split_on_cuda",
        "test_fp8_linear_with_one_pass_casts_matches_the_separate_casts_on_cuda"))  # fmt: skip
    return ("SwiGLU, RoPE, the fused Q/K/V RoPE, RMSNorm (with the residual add) forward and "
            "backward, AdamW with its bf16 copies or remainders, and the FP8 cast-transpose match "
            "the torch math on CUDA; a model with them matches Megatron's own modules")  # fmt: skip


@path
def optimizer_fusions(s: Smoke) -> str:
    """The weight gradients accumulated into main_grad by the GEMMs (and written by a step's
    first GEMM where the buffer was not zeroed), and the token division and clipping inside
    fused AdamW, against Megatron-Core's separate passes on CUDA; the step decided on the
    device skips a NaN step."""
    s.pytest("optimizer_fusions", "tests/unit_tests/training/test_wgrad_fusion.py",
             "tests/unit_tests/training/test_optim_batched.py", passed=(
        "test_fused_weight_gradients_match_the_unfused_ones_on_cuda[plain]",
        "test_fused_weight_gradients_match_the_unfused_ones_on_cuda[recompute]",
        "test_first_writes_leave_the_gradients_of_a_zeroed_buffer",
        "test_token_division_and_clipping_inside_fused_adamw_match_the_separate_passes",
        "test_a_non_finite_step_is_skipped_inside_fused_adamw"))  # fmt: skip
    return ("fused weight-gradient accumulation and the division / clipping inside AdamW match; "
            "a NaN step is skipped inside AdamW")  # fmt: skip


@path
def compiled_layers(s: Smoke) -> str:
    """model.compile_layers through inductor (bf16 layers against eager ones), then a compiled
    training run."""
    output = s.pytest("compiled_layers", "tests/unit_tests/models/test_compiled_layers.py")
    cases = re.findall(r"give_the_eager_loss_and_gradients\[(\S+)\] PASSED", output)
    if len(cases) != 1:  # inductor, bf16
        raise Failure(f"{len(cases)} of the 1 CUDA case passed (see compiled_layers.log)")
    recipe = "llama_tiny_pretrain_config"
    records = s.train("compiled_train", "train", recipe, s.work / "compiled", "train.train_iters=10",
                      "model.compile_layers=true")  # fmt: skip
    return f"CUDA cases {', '.join(cases)} passed; training {falling(records, 'compiled')}"


@path
def fp8_gradients(s: Smoke) -> str:
    """model.fp8's gradients against float64 (tests/unit_tests/models/test_fp8_gradients.py):
    cuBLAS's FP8 GEMMs and the compiled casts must carry no more error than FP8 simulated in
    float32. Eager cases only: compiled FP8 layers are refused to users (models/compiled.py)
    because their CUDA cases fail (H200, torch 2.11, 2026-12-03: the input and weight
    gradients of a compiled FP8 linear are zero, with inductor and with dynamo alone;
    scripts/performance/fp8_inductor_probe.py); run the whole file by hand to check a fix."""
    output = s.pytest(
        "fp8_gradients", "-k", "test_eager_fp8", "tests/unit_tests/models/test_fp8_gradients.py"
    )
    passed = re.findall(r"::(test_\w+\[\w+\]) PASSED", output)
    if len(passed) != 2:  # tensorwise, rowwise
        raise Failure(f"{len(passed)} of 2 cases passed (see fp8_gradients.log)")
    return "eager FP8 gradients within FP8's rounding of float64 (tensorwise, rowwise)"


def _adapter(s: Smoke, method: str) -> str:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = s.hf_llama()
    folder, records = _sft(s, f"{method}_export", f"peft.method={method}", "dataset.packed=true")
    trained = falling(records, method)
    out = folder / "export"
    s.megabridge(f"{method}_export", "export", "--megatron-path", str(folder / "ckpt"),
                 "--hf-path", str(out / "merged"), "--adapter-path", str(out / "adapter"))  # fmt: skip
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        load = dict(dtype=torch.float32, local_files_only=True)
        merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), **load).cuda()
        merged_logits = merged(input_ids=tokens).logits
        base = AutoModelForCausalLM.from_pretrained(str(hf), **load).cuda()
        base_logits = base(input_ids=tokens).logits
        adapted = PeftModel.from_pretrained(base, str(out / "adapter")).cuda()
        adapter_logits = adapted(input_ids=tokens).logits
    scale = base_logits.abs().max().item()
    apart = (merged_logits - adapter_logits).abs().max().item() / scale
    moved = (merged_logits - base_logits).abs().max().item() / scale
    # The merged weights are cast to the base's bf16: they agree with base + adapter (fp32)
    # to bf16 rounding, and the trained adapter moves the logits by far more than that.
    if not (apart < 2e-2 and moved > 5 * apart):
        raise Failure(f"merged vs base+adapter {apart:.2e}, vs base {moved:.2e} (relative)")
    return f"{trained}; export: merged vs peft {apart:.1e}, vs base {moved:.1e} (relative)"


@path
def lora_export(s: Smoke) -> str:
    return _adapter(s, "lora")


@path
def dora_export(s: Smoke) -> str:
    return _adapter(s, "dora")


@path
def resume(s: Smoke) -> str:
    """Save at 3 and 6; resume from iteration 3; the same losses after it."""
    recipe = "llama_tiny_pretrain_config"
    full = s.work / "resume_full"
    ref = losses(s.train("resume", "train", recipe, full, "train.train_iters=6",
                         "checkpoint.save_interval=3"))  # fmt: skip
    got = losses(s.train("resume", "train", recipe, s.work / "resume_from_3",
                         "train.train_iters=6", f"checkpoint.load={full / 'ckpt' / 'iter_0000003'}"))  # fmt: skip
    if sorted(got) != [4, 5, 6]:
        raise Failure(f"resumed run logged iterations {sorted(got)}, expected 4-6")
    # Iteration 4's forward sees the same weights and samples; later ones follow a backward
    # pass, whose atomics (flash attention, scatter-adds) need not add in the same order.
    if not math.isclose(got[4], ref[4], rel_tol=1e-6):
        raise Failure(f"iteration 4: resumed {got[4]!r} vs uninterrupted {ref[4]!r}")
    worst = max(abs(got[i] - ref[i]) / abs(ref[i]) for i in (5, 6))
    if worst > 1e-3:
        raise Failure(f"iterations 5-6 differ by {worst:.1e} (relative): {got} vs {ref}")
    return f"iteration 4 equal ({got[4]:.5f}), 5-6 within {worst:.1e}"


# The activation-memory options (scripts/performance/NOTES.md, 2026-12-03 perfmem).
LEAN_MEMORY = ("model.recompute_modules=layernorm", "model.recompute_swiglu=true",
               "model.recompute_cross_entropy=true")  # fmt: skip


@path
def lean_memory(s: Smoke) -> str:
    """The activation-memory options on CUDA, where their compiled kernels run: 10 steps of
    the tiny Llama with them give the plain run's losses (all of them off) within bf16 noise
    (1%)."""
    recipe, steps = "llama_tiny_pretrain_config", "train.train_iters=10"
    # the plain run with Megatron-Core's cross entropy (the logits-keeping one is the default)
    plain = losses(s.train("lean_plain", "train", recipe, s.work / "lean_plain", steps,
                           "model.recompute_cross_entropy=false",
                           "model.recompute_swiglu=false"))  # fmt: skip
    lean = losses(s.train("lean_memory", "train", recipe, s.work / "lean", steps, *LEAN_MEMORY))
    if not plain or lean.keys() != plain.keys():
        raise Failure(f"logged iterations differ: {sorted(lean)} against {sorted(plain)}")
    worst = max(abs(lean[i] - plain[i]) / abs(plain[i]) for i in plain)
    if not worst <= 0.01:
        raise Failure(f"losses differ by up to {worst:.2%}: {lean} against {plain}")
    return f"{len(plain)} steps, losses within {worst:.1e} (relative) of the plain run's"


@path
def verify_cuda(s: Smoke) -> str:
    """`megabridge verify` on CUDA in fp32 and bf16, and against a converted checkpoint."""
    hf, parts = s.hf_llama(), []
    checkpoint = s.work / "verify_mcore"
    s.megabridge("verify", "convert", "hf-to-megatron", "--hf-path", str(hf),
                 "--megatron-path", str(checkpoint))  # fmt: skip
    from_checkpoint = ["--megatron-path", str(checkpoint)]
    for dtype, extra in (("float32", []), ("bfloat16", []), ("float32", from_checkpoint)):
        output = s.megabridge("verify", "verify", "--hf-path", str(hf), "--dtype", dtype,
                              "--json", *extra)  # fmt: skip
        result = json.loads([line for line in output.splitlines() if line.startswith("{")][-1])
        if not result.get("ok"):
            raise Failure(f"verify {dtype} {' '.join(extra)}: {result}")
        where = "checkpoint" if extra else "HF"
        parts.append(f"{dtype} from {where} max|diff| {result['max_abs_diff']:.1e} "
                     f"top-1 {result['top1_agreement']:.3f}")  # fmt: skip
    return "; ".join(parts)


@path
def vlm_sft(s: Smoke) -> str:
    """SFT of a tiny Qwen2.5-VL on images (padded, bf16) and LoRA of it, on CUDA."""
    from tests.vision_models import save_colour_dataset, save_tiny_qwen2_5_vl

    hf = save_tiny_qwen2_5_vl(s.work / "hf_qwen2_5_vl")
    data = save_colour_dataset(s.work / "colours", count=32)
    parts = []
    for recipe in ("qwen25_vl_tiny_finetune_config", "qwen25_vl_tiny_lora_config"):
        records = s.train("vlm_sft", "finetune", recipe, s.work / recipe,
                          f"checkpoint.pretrained_checkpoint={hf}", f"dataset.path={data}",
                          "train.train_iters=8", "train.micro_batch_size=4",
                          "optimizer.lr=3e-3", "train.eval_interval=None")  # fmt: skip
        parts.append(f"{recipe.split('_')[-2]}: {falling(records, recipe)}")
    return "; ".join(parts)


@path
def vlm_video(s: Smoke) -> str:
    """Qwen2.5-VL video as frames on CUDA: verify --video in fp32, and SFT (bf16, padded) on
    clips, images and text-only examples."""
    from tests.vision_models import save_images, save_mixed_colour_dataset, save_tiny_qwen2_5_vl

    hf = save_tiny_qwen2_5_vl(s.work / "hf_qwen2_5_vl_video")
    frames = save_images(s.work / "video_frames", sizes=[(32, 40)] * 4)
    output = s.megabridge("vlm_video", "verify", "--hf-path", str(hf), "--json",
                          "--video", *map(str, frames))  # fmt: skip
    result = json.loads([line for line in output.splitlines() if line.startswith("{")][-1])
    if not result.get("ok"):
        raise Failure(f"verify --video: {result}")
    data = save_mixed_colour_dataset(s.work / "mixed_colours", count=24)
    records = s.train("vlm_video", "finetune", "qwen25_vl_tiny_finetune_config",
                      s.work / "vlm_video", f"checkpoint.pretrained_checkpoint={hf}",
                      f"dataset.path={data}", "train.train_iters=8", "train.micro_batch_size=4",
                      "optimizer.lr=3e-3", "train.eval_interval=None")  # fmt: skip
    return (
        f"verify --video max|diff| {result['max_abs_diff']:.1e}; sft: {falling(records, 'video')}"
    )


@path
def vlm_families_sft(s: Smoke) -> str:
    """SFT and LoRA of tiny Qwen3-VL, Qwen3-VL-MoE, Gemma 3, LLaVA and Mistral 3 on images,
    on CUDA."""
    from tests.vision_models import save_colour_dataset, save_tiny_family_vl

    data = save_colour_dataset(s.work / "colours_families", count=32)
    parts = []
    for family in ("qwen3_vl", "qwen3_vl_moe", "gemma3_vl", "llava", "mistral3"):
        hf = save_tiny_family_vl(family, s.work / f"hf_{family}")
        for kind in ("finetune", "lora"):
            recipe = f"{family}_tiny_{kind}_config"
            records = s.train("vlm_families_sft", "finetune", recipe, s.work / recipe,
                              f"checkpoint.pretrained_checkpoint={hf}", f"dataset.path={data}",
                              "train.train_iters=8", "train.micro_batch_size=4",
                              "optimizer.lr=3e-3", "train.eval_interval=None")  # fmt: skip
            parts.append(f"{family} {kind}: {falling(records, recipe)}")
    return "; ".join(parts)


@path
def throughput(s: Smoke) -> str:
    """scripts/performance/train_throughput.py at micro-batch 1 (Llama-3.2-1B shape)."""
    out = s.work / "throughput.json"
    s.run("throughput", ["scripts/performance/train_throughput.py", "--mbs", "1", "--iters", "5",
                         "--json-out", str(out), "model.vocab_size=32768",
                         "model.share_embeddings_and_output_weights=false"])  # fmt: skip
    (r,) = json.loads(out.read_text())
    if r.get("oom") or not r["tokens_per_s"] > 0:
        raise Failure(f"no throughput: {r}")
    return f"{r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu_989']:.1%}, {r['peak_mem_gib']:.1f} GiB"


# ------------------------------------------------------------------------------ driver

ALONE = {"throughput"}  # paths that run after the others, with the GPU to themselves


def _attempt(s: Smoke, name: str) -> tuple[str, bool, str, float]:
    start = time.monotonic()
    try:
        detail, ok = PATHS[name](s), True
    except Failure as e:
        detail, ok = str(e), False
    except Exception as e:  # a bug in the check itself still reports, and the rest run
        detail, ok = f"{type(e).__name__}: {e}", False
    return name, ok, detail, time.monotonic() - start


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", nargs="+", choices=sorted(PATHS), help="run only these paths")
    p.add_argument("--jobs", type=int, default=4, help="paths run at once (default 4)")
    p.add_argument("--logs", help="folder for the per-path logs (default: a temporary one)")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device: this suite is for a GPU machine", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="megabridge-smoke-"))
    logs = Path(args.logs) if args.logs else work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"gpu_smoke: {torch.cuda.get_device_name()}, torch {torch.__version__}; logs in {logs}")
    make_hf_llama(work)
    smoke, names = Smoke(work, logs), args.only or list(PATHS)
    shared = [n for n in names if n not in ALONE]
    start, results = time.monotonic(), {}

    def report(name: str, ok: bool, detail: str, took: float) -> None:
        results[name] = ok
        print(f"{'PASS' if ok else 'FAIL'} {name:22s} {took:5.0f} s  {detail}", flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for outcome in pool.map(lambda n: _attempt(smoke, n), shared):
            report(*outcome)
    for name in (n for n in names if n in ALONE):  # timed with the GPU to themselves
        report(*_attempt(smoke, name))
    failed = [n for n, ok in results.items() if not ok]
    print(f"gpu_smoke: {len(results) - len(failed)} passed, {len(failed)} failed "
          f"in {time.monotonic() - start:.0f} s" + (f": {', '.join(failed)}" if failed else ""))  # fmt: skip
    shutil.rmtree(work / "hf_llama", ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
