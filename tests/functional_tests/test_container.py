"""The image of docker/Dockerfile.ci builds and runs the README's commands (buildah, no registry).

Heavy (a Debian base, the locked environment, a training run inside: minutes on a warm
cache, much longer on a cold one), so CI leaves it out; run it with
tests/functional_tests/launch_scripts/active/L2_Launch_container_image.sh.
"""

import os
import shutil
import subprocess

import pytest

from tests.helpers import REPO

TOOLS = ("buildah", "podman", "debootstrap")

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipduringci,
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in TOOLS) or os.geteuid() != 0,
        reason="needs root and `apt-get install buildah podman debootstrap`",
    ),
]


def test_image_builds_and_runs_the_readme_commands():
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "container" / "check_image.sh")],
        capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "container check: PASS" in result.stdout, output[-4000:]
    # what the checks inside printed: the quick run's last iteration, verify's verdict
    assert '"ok": true' in result.stdout, output[-4000:]
    assert "iteration 20/20" in result.stdout, output[-4000:]
