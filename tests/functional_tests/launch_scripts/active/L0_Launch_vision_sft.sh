#!/usr/bin/env bash
# Vision-language fine-tuning: data rendered by the model's processor, loss against transformers,
# freezing, LoRA exports, bad input, and a CLI fine-tune of the tiny Qwen2.5-VL reloaded in HF;
# Qwen3-VL, Qwen3-VL-MoE, Gemma 3 and LLaVA (CI runs part; the rest is in L1_Launch_vision_language).
set -euo pipefail
cd "$(dirname "$0")/../../../.."
uv run pytest tests/unit_tests/data/test_vision_sft.py tests/functional_tests/test_vision_sft.py \
    tests/unit_tests/data/test_vision_families_sft.py \
    -m "not skipduringci" -v "$@"
