#!/usr/bin/env bash
# The GPU smoke suite: every user-facing training path on CUDA (scripts/gpu_smoke.py says which),
# one PASS/FAIL line each; exit code 1 if any failed. Run it on a GPU machine before resolving any
# change to models, training, data or PEFT:
#   uv run bash scripts/gpu_smoke.sh                 # in the project's environment
#   bash scripts/gpu_smoke.sh --jobs 4 --logs DIR    # a machine's own python3 with torch +
#                                                    # transformers + peft, and no registry access:
# there, megatron-core (and anything else missing) comes from wheels in .whl/, made on a machine
# that reaches PyPI with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl megatron-core==0.16.1
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import megatron.core" >/dev/null 2>&1; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_smoke: megatron-core is not importable and .whl/ holds no wheels (see this script's header)" >&2
    exit 2
  fi
  site="${TMPDIR:-/tmp}/megabridge-smoke-site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec python3 scripts/gpu_smoke.py "$@"
