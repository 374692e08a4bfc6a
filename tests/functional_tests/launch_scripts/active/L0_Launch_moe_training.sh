#!/usr/bin/env bash
# MoE: Mixtral / Qwen2-MoE / Qwen3-MoE / DeepSeek-V3 conversions (TP/EP logits, EP round trip) and EP=2 training.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
uv run pytest tests/functional_tests/test_moe_training.py tests/unit_tests/models/test_mixtral.py \
  tests/unit_tests/models/test_qwen2_moe.py tests/unit_tests/models/test_qwen3_moe.py \
  tests/unit_tests/models/test_deepseek_v3.py -v "$@"
