"""Megatron-LM's own checkpoint loader, run on a `convert hf-to-megatron --megatron-layout` output.

    git clone https://github.com/NVIDIA/Megatron-LM && git -C Megatron-LM checkout core_v0.16.1
    uv run python scripts/megatron_lm_load_check.py --megatron-lm Megatron-LM [--hf-path HF]

Without ``--hf-path`` a tiny random fp32 Llama is made. The model is converted with
``megabridge convert hf-to-megatron --megatron-layout``; then Megatron-LM's code, unchanged
and imported from the checkout (never copied here), does what ``pretrain_gpt.py --load CKPT
--use-checkpoint-args --ckpt-format torch_dist --finetune --no-load-optim --no-load-rng
--transformer-impl local`` does before training: parse_args, load_args_from_checkpoint (the
model's arguments come from the checkpoint's ``args``), validate_args, gpt_builder (the
model) and load_checkpoint. The loaded model's logits are compared with transformers' on
the same tokens: load_checkpoint itself falls back to a non-strict load and only prints
what it missed, so the logits are the proof that every weight arrived.

The checkout goes on sys.path after site-packages: ``megatron.training`` comes from it,
``megatron.core`` stays the installed engine (use the checkout's tag matching it). The CPU
has no CUDA: megabridge's CPU backend stands in (runtime.py; Megatron-LM all-reduces the
tracker's iteration on device='cuda'). One PASS / FAIL line per step; exit code 1 on a FAIL.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

MODEL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, rope_theta=10000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip


def make_tiny_llama(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    with torch.no_grad():
        for p in model.parameters():  # norms too: all-ones would hide a missing norm weight
            p.normal_(0.0, 0.05)
    model.save_pretrained(str(path))
    return path


def convert_with_megatron_layout(hf: Path, ckpt: Path) -> None:
    """megabridge's own CLI: ``hf`` to a Megatron checkpoint at ``ckpt`` with the layout files
    that Megatron-LM and Megatron-Bridge read (``--megatron-layout``)."""
    subprocess.run(
        [sys.executable, "-m", "megabridge", "convert", "hf-to-megatron", "--hf-path", str(hf),
         "--megatron-path", str(ckpt), "--megatron-layout", "--overwrite"],
        check=True,
    )  # fmt: skip


def report(ok: bool, what: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {what}", flush=True)
    return ok


def megatron_lm_argv(ckpt: Path) -> list[str]:
    """pretrain_gpt.py's command line for a fine-tune from ``ckpt`` (README's command)."""
    return [
        "pretrain_gpt.py", "--load", str(ckpt), "--use-checkpoint-args",
        "--ckpt-format", "torch_dist", "--finetune", "--no-load-optim", "--no-load-rng",
        "--transformer-impl", "local", "--use-cpu-initialization", "--no-gradient-accumulation-fusion",
        "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", str(MODEL["vocab_size"] - 1),
        "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-rope-fusion",
        "--no-persist-layer-norm",
    ]  # fmt: skip


def run_megatron_lm(ckpt: Path):
    """Megatron-LM's steps up to a loaded model; returns (its args, the model, iteration)."""
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.checkpointing import load_args_from_checkpoint, load_checkpoint
    from megatron.training.global_vars import set_global_variables

    from megabridge import runtime

    sys.argv = megatron_lm_argv(ckpt)
    args = parse_args()
    load_args_from_checkpoint(args)
    validate_args(args, {})
    set_global_variables(args, build_tokenizer=False)
    runtime.init_distributed()
    runtime.init_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    runtime.seed_everything(1234)
    from gpt_builders import gpt_builder  # Megatron-LM's repository root
    from model_provider import model_provider

    model = model_provider(gpt_builder)
    iteration, _ = load_checkpoint([model], None, None, strict=True)
    return args, model, iteration


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--megatron-lm", type=Path, required=True, help="a Megatron-LM checkout")
    p.add_argument("--hf-path", type=Path, help="an HF Llama folder (default: a tiny random one)")
    p.add_argument("--workdir", type=Path, help="where the checkpoint goes (default: a temp dir)")
    opts = p.parse_args()
    if not (opts.megatron_lm / "megatron" / "training" / "checkpointing.py").is_file():
        sys.exit(f"--megatron-lm {opts.megatron_lm}: no megatron/training/checkpointing.py there")
    work = opts.workdir or Path(tempfile.mkdtemp(prefix="mlm-load-"))
    hf = opts.hf_path or make_tiny_llama(work / "hf")
    ckpt = work / "megatron-layout"
    convert_with_megatron_layout(hf, ckpt)
    sys.path.append(str(opts.megatron_lm.resolve()))  # after site-packages: megatron.core stays
    args, model, iteration = run_megatron_lm(ckpt)
    from megabridge.conversion import verify

    ok = report(iteration == 0, f"load_checkpoint returned iteration {iteration} (finetune: 0)")
    ok &= report(
        args.padded_vocab_size >= MODEL["vocab_size"] and args.swiglu,
        f"load_args_from_checkpoint: {args.num_layers} layers, hidden {args.hidden_size}, "
        f"{args.num_query_groups} query groups, padded vocab {args.padded_vocab_size}, "
        f"swiglu {args.swiglu}, rotary base {args.rotary_base}",
    )
    tokens = verify.sample_tokens(MODEL["vocab_size"], 2, 16, seed=0)
    theirs = verify.megatron_logits([model], tokens)[..., : MODEL["vocab_size"]]
    reference = verify.hf_logits(hf, tokens, torch.float32, torch.device("cpu"))
    diff = (theirs - reference).abs().max().item()
    ok &= report(
        diff < 1e-4, f"Megatron-LM's loaded model vs transformers: max |logit diff| {diff:.2e}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
