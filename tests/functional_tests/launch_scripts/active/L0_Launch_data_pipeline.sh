#!/usr/bin/env bash
# The data pipeline: preprocess -> indexed pretraining (one prefix, a blend), SFT, bad data.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
uv run pytest tests/functional_tests/test_data.py -v "$@"
