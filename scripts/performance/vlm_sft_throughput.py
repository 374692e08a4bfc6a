"""Vision-language SFT step throughput: megabridge next to transformers' own model, one run.

    python scripts/performance/vlm_sft_throughput.py --mbs 1 2 4          # Qwen2.5-VL-3B shape, GPU
    python scripts/performance/vlm_sft_throughput.py --tiny               # tiny model, CPU check

Both stacks train a Qwen2.5-VL-3B-shaped model (the qwen25_vl_3b_finetune_config recipe's
shapes) from random weights on the same fixed micro-batch: ``--mbs`` chat examples of
``--seq`` tokens, each an image (four sizes, 256 to 576 image tokens at patch 14) and a
question, then an answer of filler words; the loss covers the answers. The batch is made
once by megabridge's SFT data path (training/data/vision_sft.py, through a generated HF
processor: Qwen2.5-VL's image processor and a word-level tokenizer with the release's
special-token ids) and handed to both:

* megabridge: the recipe's training setup (bf16 weights, fp32 main weights and grads,
  Megatron's Adam, gradient clipping), one train_step per micro-batch;
* hf: Qwen2_5_VLForConditionalGeneration (sdpa) in fp32 with bf16 autocast, fused AdamW,
  gradient clipping, the loss on the same answer tokens.

tokens/s counts every position of the batch (text and image tokens): mbs x seq / median
step time over ``--iters`` steps after ``--warmup``. Peak GiB: torch's max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from megabridge.cli import quiet_expected_warnings, setup_logging  # noqa: E402

# Image (height, width) in pixels: at patch 14 and merge 2, 256, 352, 352 and 576 tokens.
IMAGE_SIZES = [(448, 448), (308, 896), (896, 308), (672, 672)]
TINY_IMAGE_SIZES = [(32, 32), (24, 48), (48, 24), (40, 40)]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
VISION_NAMES = ("vision_start", "vision_end", "image", "video")  # the config's *_token_id
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
)


def _save_processor(folder: Path, vision: dict) -> None:
    """Qwen2.5-VL's image processor and a word-level tokenizer whose special tokens have the
    model's ids (vision start at vision_start_token_id, ...), with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessorPil,
        Qwen2VLVideoProcessor,
    )

    fixed = {vision[f"{name}_token_id"]: f"<|{name}|>" for name in VISION_NAMES}
    fixed = {i: fixed[i].replace("image|", "image_pad|").replace("video|", "video_pad|")
             for i in fixed}  # fmt: skip
    size = max(fixed) + 1
    words = [fixed.get(i, SPECIALS[i] if i < len(SPECIALS) else f"w{i}") for i in range(size)]
    vocab = {w: i for i, w in enumerate(words + CHAT_TOKENS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=VISION_TOKENS + CHAT_TOKENS,
    )  # fmt: skip
    sizes = dict(patch_size=vision["patch_size"], merge_size=vision["spatial_merge_size"],
                 temporal_patch_size=vision["temporal_patch_size"])  # fmt: skip
    images = Qwen2VLImageProcessorPil(**sizes, min_pixels=16 * 16, max_pixels=1024 * 1024)
    processor = Qwen2_5_VLProcessor(
        images, tokenizer, Qwen2VLVideoProcessor(**sizes), chat_template=CHAT_TEMPLATE
    )
    processor.save_pretrained(str(folder))


def _save_data(folder: Path, mbs: int, seq: int, sizes, vision: dict) -> None:
    """``mbs`` examples of exactly seq + 1 tokens: image, question, a long answer."""
    import numpy as np
    from PIL import Image

    unit = (vision["patch_size"] * vision["spatial_merge_size"]) ** 2
    rng = np.random.default_rng(0)
    lines = []
    for i in range(mbs):
        h, w = sizes[i % len(sizes)]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        # <|im_start|> user <vs> image <ve> w1 w2 <|im_end|> <|im_start|> assistant ... <|im_end|>
        fixed = 10 + h * w // unit
        answer = " ".join(f"w{k}" for k in rng.integers(0, 1000, seq + 1 - fixed))
        user = [{"type": "image", "image": f"{i}.png"}, {"type": "text", "text": "w1 w2"}]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        lines.append(json.dumps({"messages": messages}) + "\n")
    (folder / "train.jsonl").write_text("".join(lines))


class _FixedBatch:
    """A dataset whose every micro-batch is ``batch`` (both stacks time the same inputs)."""

    def __init__(self, batch: dict, mbs: int):
        self.batch, self.mbs = batch, mbs

    def __len__(self) -> int:
        return self.mbs

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, samples) -> dict:
        return self.batch


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(step, warmup: int, iters: int, device) -> list[float]:
    times = []
    for i in range(warmup + iters):
        _sync(device)
        start = time.perf_counter()
        step(i)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _result(name, mbs, seq, times, device) -> dict:
    step = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"impl": name, "micro_batch": mbs, "step_ms": step * 1e3,
            "tokens_per_s": mbs * seq / step, "peak_mem_gib": peak}  # fmt: skip


def run_megabridge(args, mbs: int, workdir: Path) -> tuple[dict, dict, object]:
    """megabridge's row, the fixed batch (on the CPU) and the model config."""
    from megabridge import runtime
    from megabridge.recipes import get_recipe
    from megabridge.training.config import apply_overrides
    from megabridge.training.loop import setup
    from megabridge.training.step import train_step

    cfg = apply_overrides(get_recipe(args.recipe), args.overrides)
    vision = cfg.model.vision
    _save_processor(workdir, vision)
    _save_data(workdir, mbs, args.seq, TINY_IMAGE_SIZES if args.tiny else IMAGE_SIZES, vision)
    cfg.tokenizer.path, cfg.dataset.path = str(workdir), str(workdir / "train.jsonl")
    cfg.dataset.seq_length, cfg.dataset.valid_fraction = args.seq, 0.0
    cfg.model.seq_length = max(cfg.model.seq_length, args.seq)
    cfg.train.micro_batch_size = cfg.train.global_batch_size = mbs
    cfg.train.train_iters, cfg.train.eval_interval = args.warmup + args.iters, None
    cfg.checkpoint.save, cfg.logger.log_dir = str(workdir / "ckpt"), str(workdir / "logs")
    cfg.logger.tensorboard = False
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    s = setup(cfg)
    data = s.train_data
    assert len(data) == mbs, "an example did not fit --seq"
    batch = data.collate([data[i] for i in range(mbs)])
    assert batch["tokens"].shape == (mbs, args.seq) and batch["loss_mask"].sum() > 0
    fixed = _FixedBatch(batch, mbs)

    def step(i):
        train_step(cfg, s.model, s.optimizer, s.scheduler, fixed, i * mbs)

    try:
        times = _time(step, args.warmup, args.iters, s.rt.device)
        return _result("megabridge", mbs, args.seq, times, s.rt.device), batch, cfg.model
    finally:
        runtime.shutdown()


def run_hf(args, batch: dict, model_cfg) -> dict:
    from transformers import AutoConfig, AutoModelForImageTextToText

    from megabridge.conversion.registry import bridge_for_family

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = bridge_for_family(model_cfg.family).hf_config_dict(model_cfg)
    hf_config = AutoConfig.for_model(data.pop("model_type"), **data)
    hf_config._attn_implementation = "sdpa"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = AutoModelForImageTextToText.from_config(hf_config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    b = {k: v.to(device) for k, v in batch.items()}
    # transformers shifts labels itself: its label at t + 1 is our label at t (masked).
    answers = torch.where(b["loss_mask"].bool(), b["labels"], -100)
    labels = torch.cat([torch.full_like(answers[:, :1], -100), answers[:, :-1]], dim=1)
    inputs = dict(
        input_ids=b["tokens"], pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"],
        mm_token_type_ids=(b["tokens"] == model_cfg.vision["image_token_id"]).int(),
        labels=labels,
    )  # fmt: skip

    def step(i):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()

    times = _time(step, args.warmup, args.iters, device)
    return _result("hf", len(batch["tokens"]), args.seq, times, device)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--recipe", default="qwen25_vl_3b_finetune_config")
    p.add_argument("--tiny", action="store_true",
                   help="the tiny Qwen2.5-VL recipe, seq 128, 2 steps: a CPU check")  # fmt: skip
    p.add_argument("--mbs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-hf", action="store_true", help="time megabridge only")
    p.add_argument("--json-out", help="write all results here")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    args = p.parse_args()
    if args.tiny:
        args.recipe, args.seq, args.iters, args.warmup = "qwen25_vl_tiny_finetune_config", 128, 2, 1
        args.mbs = args.mbs if args.mbs != [1, 2, 4] else [2]
    elif not torch.cuda.is_available():
        sys.exit("vlm_sft_throughput.py needs a GPU (or --tiny for a CPU check)")
    if len(args.mbs) > 1:
        # One process per micro-batch: a stack's memory is not fully given back within one
        # process (measured on the H200: micro-batch 2 ran out of memory after micro-batch 1).
        results = [_child_rows(args, mbs) for mbs in args.mbs]
        _report([row for rows in results for row in rows], args)
        return
    quiet_expected_warnings()
    setup_logging()
    results = []
    for mbs in args.mbs:
        with tempfile.TemporaryDirectory() as workdir:
            row, batch, model_cfg = run_megabridge(args, mbs, Path(workdir))
        results.append(row)
        print("result:", json.dumps(row), flush=True)
        if not args.no_hf:
            results.append(run_hf(args, batch, model_cfg))
            print("result:", json.dumps(results[-1]), flush=True)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    _report(results, args)


def _child_rows(args, mbs: int) -> list[dict]:
    """Run this script for one micro-batch in a fresh process and return its result rows."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, __file__, "--recipe", args.recipe, "--mbs", str(mbs),
               "--seq", str(args.seq), "--iters", str(args.iters), "--warmup", str(args.warmup),
               "--json-out", str(out), *(["--no-hf"] if args.no_hf else []),
               *(["--tiny"] if args.tiny else []), *args.overrides]  # fmt: skip
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def _report(results: list[dict], args) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{device} | seq {args.seq} | recipe {args.recipe} {' '.join(args.overrides)}")
    print(f"{'impl':12s} {'mbs':>3s} {'step ms':>9s} {'tokens/s':>10s} {'peak GiB':>8s}")
    for r in results:
        print(f"{r['impl']:12s} {r['micro_batch']:3d} {r['step_ms']:9.1f} "
              f"{r['tokens_per_s']:10,.0f} {r['peak_mem_gib']:8.1f}")  # fmt: skip
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
