"""A real single-host Slurm for tests: munged, slurmctld and slurmd on localhost.

Configured for a container without systemd or cgroup v2 delegation: process tracking by
/proc (proctrack/linuxproc), no task plugin, cgroup v1 paths only for slurmd's start-up
checks, every file (config, key, sockets, spool, logs) in one temporary folder, free
ports. Needs root (slurmd starts jobs as their user) and Debian's slurm-wlm + munge,
which .ci/run installs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def missing() -> str | None:
    """Why a real Slurm cannot start here, or None."""
    for tool in (*DAEMONS, "sbatch", "scontrol", "sinfo"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurmd must run as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(root: Path, host: str, cpus: int) -> str:
    return f"""\
ClusterName=megabridge-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=60
StateSaveLocation={root}/ctld
SlurmdSpoolDir={root}/d
SlurmctldPidFile={root}/ctld.pid
SlurmdPidFile={root}/d.pid
SlurmctldLogFile={root}/ctld.log
SlurmdLogFile={root}/d.log
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """Start with ``start()``; ``env`` is what a client (sbatch, scontrol) needs; ``stop()``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.env = {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}
        self._procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 60) -> None:
        root = self.root
        for sub in ("ctld", "d"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        host = socket.gethostname().split(".")[0]
        (root / "slurm.conf").write_text(_config(root, host, os.cpu_count() or 1))
        # Only slurmd's start-up reads cgroup.conf; v1 paths are what this container has.
        (root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nIgnoreSystemd=yes\n")
        self._spawn("munged", "--foreground", "--force", f"--key-file={key}",
                    f"--socket={root}/munge.socket", f"--pid-file={root}/munged.pid",
                    f"--log-file={root}/munged.log", f"--seed-file={root}/munge.seed")  # fmt: skip
        self._wait_for(lambda: (root / "munge.socket").exists(), timeout, "munged")
        self._spawn("slurmctld", "-D", "-i")
        self._spawn("slurmd", "-D")
        self._wait_for(self._node_idle, timeout, "the node to be idle")

    def _spawn(self, *cmd: str) -> None:
        log = open(self.root / f"{cmd[0]}.out", "w")
        self._procs.append(
            subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        )

    def _node_idle(self) -> bool:
        out = self.run("sinfo", "--noheader", "--format=%T", check=False).stdout
        return out.strip() == "idle"

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ready():
                return
            for p in self._procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited: {self.logs()}")
            time.sleep(0.5)
        raise TimeoutError(f"waiting for {what}: {self.logs()}")

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check)

    def job_state(self, job_id: str) -> dict[str, str]:
        """scontrol's fields of one job (JobState, Restarts, ExitCode ...)."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def logs(self) -> str:
        parts = []
        for name in ("ctld.log", "d.log", "munged.log", "slurmctld.out", "slurmd.out"):
            path = self.root / name
            if path.is_file():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(parts)

    def stop(self) -> None:
        for p in reversed(self._procs):
            p.terminate()
        for p in self._procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
