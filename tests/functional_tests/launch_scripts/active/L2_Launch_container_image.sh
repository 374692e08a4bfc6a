#!/usr/bin/env bash
# docker/Dockerfile.ci: build with buildah on a local Debian base, run --help, the quick run and
# a tiny convert + verify inside. Needs root and `apt-get install buildah podman debootstrap`.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
uv run pytest tests/functional_tests/test_container.py -m "skipduringci" -v "$@"
