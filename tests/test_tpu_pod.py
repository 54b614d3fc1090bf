"""tools/tpu_pod/pod.py --dry-run prints the gcloud commands of a pod launch and runs none of them."""

import os
import shlex
import subprocess
import sys

import pytest

POD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "tpu_pod", "pod.py")
COMMON = ["--name", "r1", "--zone", "us-east5-a", "--project", "proj", "--dry-run"]


def _dry(*args: str) -> list[list[str]]:
    out = subprocess.run([sys.executable, POD, *COMMON, *args], check=True, capture_output=True, text=True).stdout
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


def test_all_creates_copies_installs_and_runs_on_every_worker():
    cmds = _dry("--accelerator", "v5p-4096", "all", "--", "train", "--preset", "r1")
    create = cmds[0]
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "r1"]
    assert "--accelerator-type=v5p-4096" in create and "--runtime-version=v2-alpha-tpuv5" in create
    assert "--node-id=r1" in create and "--zone=us-east5-a" in create and "--project=proj" in create
    assert cmds[1][4] == "describe" and "--format=value(state.state)" in cmds[1]
    assert "git ls-files -z | tar czf" in cmds[2][-1]
    scp = cmds[3]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    ssh = [c for c in cmds if c[3:5] == ["tpu-vm", "ssh"]]
    assert len(ssh) == 3 and all("--worker=all" in c for c in ssh)
    unpack, install, run = (next(a for a in c if a.startswith("--command=")) for c in ssh)
    assert "tar xzf ~/r1jax.tar.gz -C ~/r1jax" in unpack
    assert "pip install -q -e '.[tpu]'" in install
    assert "python tools/tpu_pod/worker.py train --preset r1 > ~/r1jax-logs/run.log" in run


def test_multislice_logs_and_git_clone():
    cmds = _dry("--accelerator", "v6e-256", "--slices", "2", "create")
    assert "--node-count=2" in cmds[0] and "--node-prefix=r1" in cmds[0]
    assert "--runtime-version=v2-alpha-tpuv6e" in cmds[0]
    logs = _dry("--accelerator", "v6e-256", "--slices", "2", "logs")
    assert len(logs) == 2 * 64  # 256 chips, 4 per host, per slice
    assert logs[-1][5:7] == ["r1-1:~/r1jax-logs/run.log", "logs/r1/r1-1-worker-63.log"] and "--worker=63" in logs[-1]
    clone = _dry("--accelerator", "v5litepod-8", "--git-url", "https://example.com/r1jax.git", "copy")
    assert len(clone) == 1 and "git clone https://example.com/r1jax.git ~/r1jax" in clone[0][-1]


def test_run_needs_arguments():
    with pytest.raises(subprocess.CalledProcessError):
        _dry("run")
