"""Time and peak memory of `megabridge convert hf-to-megatron` and of the streamed
`convert megatron-to-hf` back, against the plain floor.

The floor: load every tensor with safetensors and torch.save it (one process).
Peak memory is the proportional set size (PSS: shared pages split between the
processes that map them, so forked writers are not counted twice) of the whole
process tree, sampled every 20 ms; the script also prints the footprint of the
same command's imports alone (python -c "import megabridge...") for reference: importing
megatron-core is a fixed cost of seconds that has nothing to do with the model's size.

    uv run python scripts/performance/conversion_speed.py --hidden 2048 --layers 16   # ~2 GB bf16
    # keep the model and its checkpoint in DIR, time only the export (floor and imports too):
    uv run python scripts/performance/conversion_speed.py --workdir DIR --export-only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

# Each timed command prints the CPU seconds of its own work after its imports ("WORK_CPU s"
# on stderr): the like-for-like comparison, free of the imports' noisy fixed cost.
FLOOR = """
import sys, time, torch
from pathlib import Path
from safetensors import safe_open
start = time.process_time()
src, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir()
for file in sorted(src.glob("*.safetensors")):
    with safe_open(str(file), framework="pt") as f:
        for name in f.keys():
            torch.save(f.get_tensor(name), out / f"{name}.pt")
print(f"WORK_CPU {time.process_time() - start}", file=sys.stderr)
"""

IDLE = "import megabridge.cli, megatron.core, transformers, megabridge.conversion.auto_bridge"
MEGABRIDGE = f"""
import sys, time
{IDLE}
from megabridge.cli import main
start = time.process_time()
rc = main(sys.argv[1:])
print(f"WORK_CPU {{time.process_time() - start}}", file=sys.stderr)
sys.exit(rc)
"""


def make_llama(folder: Path, hidden: int, layers: int, vocab: int) -> int:
    """A random bf16 Llama folder, one safetensors file per layer (so that making a large
    one holds a layer in memory, not the model); returns its size in bytes."""
    folder.mkdir(parents=True)
    heads, kv, ffn = hidden // 64, max(hidden // 256, 1), hidden * 4
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    weight_map = {}

    def save(tensors: dict, file: str) -> None:
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))

    files = layers + 1
    save({"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": rand(hidden),
          "lm_head.weight": rand(vocab, hidden)}, f"model-00001-of-{files:05d}.safetensors")  # fmt: skip
    for i in range(layers):
        p = f"model.layers.{i}."
        save({
            p + "input_layernorm.weight": rand(hidden), p + "post_attention_layernorm.weight": rand(hidden),
            p + "self_attn.q_proj.weight": rand(hidden, hidden), p + "self_attn.k_proj.weight": rand(kv * 64, hidden),
            p + "self_attn.v_proj.weight": rand(kv * 64, hidden), p + "self_attn.o_proj.weight": rand(hidden, hidden),
            p + "mlp.gate_proj.weight": rand(ffn, hidden), p + "mlp.up_proj.weight": rand(ffn, hidden),
            p + "mlp.down_proj.weight": rand(hidden, ffn),
        }, f"model-{i + 2:05d}-of-{files:05d}.safetensors")  # fmt: skip
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return size


def measure(cmd: list[str], pythonpath: str | None = None) -> tuple[float, float, int, float]:
    """(seconds, CPU seconds, peak resident bytes, work CPU seconds) of the process tree.
    The CPU seconds (user + system) vary far less than the wall time on a shared machine;
    the work CPU seconds are those the command spent after its imports."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    if pythonpath:  # another megabridge source tree (the baseline of a before/after run)
        env["PYTHONPATH"] = pythonpath
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            try:
                procs = [proc, *proc.children(recursive=True)]
                peak = max(peak, sum(p.memory_full_info().pss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode:
        sys.exit(f"{cmd[:4]} failed:\n{err.decode()[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(getattr(after, f) - getattr(before, f) for f in ("ru_utime", "ru_stime"))
    work = [ln for ln in err.decode().splitlines() if ln.startswith("WORK_CPU ")]
    work_cpu = float(work[-1].split()[1]) if work else float("nan")
    return time.perf_counter() - start, cpu, peak, work_cpu


def best(runs: list[tuple]) -> tuple:
    """Per column, the best (lowest) of several rounds; peak memory the highest."""
    wall, cpu, peak, work = zip(*runs, strict=True)
    return min(wall), min(cpu), max(peak), min(work)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--workdir", type=Path, help="keep the model and checkpoint here (reused)")
    p.add_argument("--export-only", action="store_true", help="skip timing hf-to-megatron")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds; best of each row")
    p.add_argument(
        "--baseline-src", type=Path,
        help="also time the export of another megabridge checkout's src (before/after, interleaved)",
    )  # fmt: skip
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        hf, mg = root / f"hf-{args.hidden}-{args.layers}", root / f"mg-{args.hidden}-{args.layers}"
        if not (hf / "config.json").is_file():
            make_llama(hf, args.hidden, args.layers, args.vocab)
        size = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
        for stale in ("floor", "back"):
            shutil.rmtree(root / stale, ignore_errors=True)
        tool = [sys.executable, "-c", MEGABRIDGE]
        to_mg = [*tool, "convert", "hf-to-megatron", "--hf-path", str(hf),
                 "--megatron-path", str(mg), "--overwrite"]  # fmt: skip
        back = [*tool, "convert", "megatron-to-hf", "--megatron-path", str(mg),
                "--hf-path", str(root / "back")]  # fmt: skip
        rows: dict[str, list] = {}
        for _ in range(args.rounds):
            rows.setdefault("floor", []).append(
                measure([sys.executable, "-c", FLOOR, str(hf), str(root / "floor")])
            )
            shutil.rmtree(root / "floor")  # a model's size of disk, needed again for the export
            rows.setdefault("idle", []).append(measure([sys.executable, "-c", IDLE]))
            if not args.export_only or not mg.is_dir():
                rows.setdefault("import", []).append(measure(to_mg))
            if args.baseline_src:
                rows.setdefault("baseline", []).append(measure(back, str(args.baseline_src)))
                shutil.rmtree(root / "back")
            rows.setdefault("export", []).append(measure(back))
            shutil.rmtree(root / "back")
    report(rows, size, args)


def report(rows: dict, size: int, args) -> None:
    gib = 2**30
    measured = {name: best(runs) for name, runs in rows.items()}
    print(f"model: {size / gib:.2f} GiB bf16 (hidden {args.hidden}, {args.layers} layers, "
          f"vocab {args.vocab}); best of {args.rounds}: wall s, CPU s (user + system), "
          f"peak PSS, work CPU s (after the command's imports)")  # fmt: skip
    labels = {
        "floor": "floor (safetensors load + torch.save per tensor)",
        "idle": "imports alone (megabridge, megatron-core, transformers)",
        "import": "megabridge convert hf-to-megatron",
        "baseline": f"megatron-to-hf, baseline {args.baseline_src}",
        "export": "megabridge convert megatron-to-hf (streamed)",
    }
    for name, (wall, cpu, mem, work) in measured.items():
        print(f"{labels[name]:57s} {wall:7.1f} s {cpu:7.1f} CPU s {mem / gib:6.2f} GiB "
              f"{work:7.1f} work CPU s")  # fmt: skip
    floor, idle = measured["floor"], measured["idle"]
    for name in ("import", "baseline", "export"):
        if name not in measured:
            continue
        wall, cpu, mem, work = measured[name]
        print(
            f"{name}: time ratio {wall / floor[0]:.2f}x; without the imports' fixed cost "
            f"{(wall - idle[0]) / floor[0]:.2f}x wall, {(cpu - idle[1]) / floor[1]:.2f}x CPU; "
            f"work CPU / floor's work CPU {work / floor[3]:.2f}x "
            f"(targets: import <= 2x, export <= 1.5x); peak above the imports / model "
            f"{(mem - idle[2]) / size:.2f} (target < 0.5 at ~2 GB, < 0.25 larger); "
            f"whole process / model {mem / size:.2f}"
        )


if __name__ == "__main__":
    main()
