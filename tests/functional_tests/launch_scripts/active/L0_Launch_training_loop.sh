#!/usr/bin/env bash
# The training loop: quick run, TP/PP equivalence, resume (also at another layout), stale checkpoints, bad overrides.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
uv run pytest tests/functional_tests/test_training.py -v "$@"
