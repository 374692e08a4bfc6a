#!/usr/bin/env bash
# MoE: Mixtral / Qwen2-MoE / Qwen3-MoE / DeepSeek-V3 conformance (round trips, TP/PP/EP logits, EP round trip) and EP=2 training.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
uv run pytest tests/functional_tests/test_moe_training.py -v "$@"
uv run pytest tests/unit_tests/models/test_conformance.py \
  -k "mixtral or qwen2_moe or qwen3_moe or deepseek_v3" -v "$@"
