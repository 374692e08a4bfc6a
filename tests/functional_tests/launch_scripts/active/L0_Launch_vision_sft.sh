#!/usr/bin/env bash
# Vision-language fine-tuning: data rendered by the model's processor, loss against transformers,
# freezing, LoRA exports, bad input, and a CLI fine-tune of the tiny Qwen2.5-VL reloaded in HF.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
uv run pytest tests/unit_tests/data/test_vision_sft.py tests/functional_tests/test_vision_sft.py \
    -m "not skipduringci" -v "$@"
