#!/usr/bin/env bash
# Resilience: SIGKILL / SIGTERM and resume, damaged checkpoints, NaN steps, a dead rank, full disks.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
uv run pytest tests/functional_tests/test_resilience.py \
  tests/unit_tests/training/test_checkpoint_integrity.py \
  tests/unit_tests/training/test_signals.py \
  tests/unit_tests/training/test_data_order.py -v "$@"
