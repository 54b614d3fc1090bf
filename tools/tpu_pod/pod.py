"""Launch r1jax on a TPU VM pod slice with gcloud: create, copy, install, run on all workers, collect logs, delete.

    python tools/tpu_pod/pod.py --name r1 --zone us-east5-a --accelerator v5p-4096 up            # create+copy+install
    python tools/tpu_pod/pod.py --name r1 --zone us-east5-a --accelerator v5p-4096 run -- train --preset r1 ...
    python tools/tpu_pod/pod.py --name r1 --zone us-east5-a --accelerator v5p-4096 logs          # -> logs/r1/
    python tools/tpu_pod/pod.py --name r1 --zone us-east5-a delete
    ... --dry-run <step>    prints the commands, one per line, and runs nothing

Steps:
    create   ``gcloud compute tpus queued-resources create`` (``--slices N``: N slices over DCN, nodes NAME-0..N-1),
             then polls ``describe`` until the queued resource is ACTIVE (``--spot`` / ``--reserved`` optional).
    copy     a tarball of the git-tracked files of this checkout (``git ls-files``: local edits included),
             ``tpu-vm scp --worker=all`` to every worker, unpacked into ``~/r1jax``; or ``--git-url URL --git-ref REF``
             to ``git clone`` on the workers instead.
    install  on all workers: a venv in ``~/r1jax/.venv`` and ``pip install -e .[tpu]``.
    run      on all workers at once (``tpu-vm ssh --worker=all``): ``tools/tpu_pod/worker.py ARGS`` (it calls
             ``jax.distributed.initialize()`` and then the ``r1jax`` CLI), output to ``~/r1jax-logs/run.log``;
             ``--detach`` leaves it running under nohup.
    logs     ``tpu-vm scp --worker=i`` of each worker's ``~/r1jax-logs/run.log`` to ``logs/NAME/[node-]worker-i.log``.
    up       create, copy, install.   all: up, then run (ARGS after ``--``).   delete: the queued resource and nodes.

Accelerator names as gcloud spells them: v5p-N counts TensorCores (2 per chip: 2048 chips = v5p-4096), v5litepod-N
and v6e-N count chips. Workers = chips / chips per host (4 on pod slices, 8 on single-host v5e-8 / v6e-8).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNTIME = {
    "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}
REMOTE_DIR = "~/r1jax"
LOG_DIR = "~/r1jax-logs"


def chips_and_workers(accelerator: str) -> tuple[int, int]:
    """(chips, hosts) of one slice, e.g. v5p-4096 -> (2048, 512), v6e-8 -> (8, 1), v6e-256 -> (256, 64)."""
    family, _, n = accelerator.rpartition("-")
    if family not in RUNTIME or not n.isdigit():
        raise SystemExit(f"unknown accelerator type {accelerator!r}; families: {sorted(RUNTIME)}")
    chips = int(n) // 2 if family in ("v4", "v5p") else int(n)
    per_host = 8 if family in ("v5litepod", "v6e") and chips <= 8 else 4
    return chips, max(1, chips // per_host)


class Pod:
    def __init__(self, args):
        self.a = args
        self.dry = args.dry_run

    # --- plumbing ----------------------------------------------------------------------------------------------------
    def sh(self, cmd: list[str], *, check: bool = True, capture: bool = False) -> str:
        print(shlex.join(cmd), flush=True)
        if self.dry:
            return ""
        out = subprocess.run(cmd, check=check, text=True, stdout=subprocess.PIPE if capture else None)
        return out.stdout or ""

    def where(self) -> list[str]:
        return [f"--zone={self.a.zone}"] + ([f"--project={self.a.project}"] if self.a.project else [])

    def nodes(self) -> list[str]:
        n = self.a.slices
        return [self.a.name] if n == 1 else [f"{self.a.name}-{i}" for i in range(n)]

    def ssh_all(self, command: str) -> None:
        for node in self.nodes():
            self.sh(
                [
                    "gcloud",
                    "compute",
                    "tpus",
                    "tpu-vm",
                    "ssh",
                    node,
                    *self.where(),
                    "--worker=all",
                    f"--command={command}",
                ]
            )

    # --- steps -------------------------------------------------------------------------------------------------------
    def create(self) -> None:
        a = self.a
        family = a.accelerator.rpartition("-")[0]
        cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", a.name, *self.where()]
        cmd += [f"--accelerator-type={a.accelerator}", f"--runtime-version={a.runtime or RUNTIME[family]}"]
        cmd += [f"--node-id={a.name}"] if a.slices == 1 else [f"--node-count={a.slices}", f"--node-prefix={a.name}"]
        cmd += ["--spot"] if a.spot else ["--reserved"] if a.reserved else []
        self.sh(cmd)
        describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", a.name, *self.where()]
        describe += ["--format=value(state.state)"]
        while True:
            state = self.sh(describe, capture=True).strip()
            if self.dry or state == "ACTIVE":
                return
            if state in ("FAILED", "SUSPENDED"):
                raise SystemExit(f"queued resource {a.name} is {state}")
            time.sleep(a.poll_s)

    def copy(self) -> None:
        a = self.a
        if a.git_url:
            clone = f"rm -rf {REMOTE_DIR} && git clone {shlex.quote(a.git_url)} {REMOTE_DIR}"
            self.ssh_all(f"{clone} && cd {REMOTE_DIR} && git checkout {shlex.quote(a.git_ref)}")
            return
        tarball = os.path.join(a.tmp, f"{a.name}-r1jax.tar.gz")
        self.sh(
            ["bash", "-c", f"cd {shlex.quote(ROOT)} && git ls-files -z | tar czf {shlex.quote(tarball)} --null -T -"]
        )
        for node in self.nodes():
            self.sh(
                [
                    "gcloud",
                    "compute",
                    "tpus",
                    "tpu-vm",
                    "scp",
                    tarball,
                    f"{node}:~/r1jax.tar.gz",
                    *self.where(),
                    "--worker=all",
                ]
            )
        self.ssh_all(f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar xzf ~/r1jax.tar.gz -C {REMOTE_DIR}")

    def install(self) -> None:
        self.ssh_all(
            f"cd {REMOTE_DIR} && python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip "
            f"&& pip install -q -e '.[tpu]'"
        )

    def run(self) -> None:
        args = shlex.join(self.a.args)
        inner = f"cd {REMOTE_DIR} && . .venv/bin/activate && mkdir -p {LOG_DIR} && "
        job = f"python tools/tpu_pod/worker.py {args} > {LOG_DIR}/run.log 2>&1"
        self.ssh_all(
            inner
            + (
                f"nohup {job} < /dev/null &"
                if self.a.detach
                else f"{job}; rc=$?; tail -n 20 {LOG_DIR}/run.log; exit $rc"
            )
        )

    def logs(self) -> None:
        _, workers = chips_and_workers(self.a.accelerator)
        out = os.path.join(self.a.logs_dir, self.a.name)
        if not self.dry:
            os.makedirs(out, exist_ok=True)
        for node in self.nodes():
            prefix = "" if self.a.slices == 1 else f"{node}-"
            for i in range(workers):
                dest = os.path.join(out, f"{prefix}worker-{i}.log")
                self.sh(
                    [
                        "gcloud",
                        "compute",
                        "tpus",
                        "tpu-vm",
                        "scp",
                        f"{node}:{LOG_DIR}/run.log",
                        dest,
                        *self.where(),
                        f"--worker={i}",
                    ],
                    check=False,
                )

    def delete(self) -> None:
        self.sh(
            [
                "gcloud",
                "compute",
                "tpus",
                "queued-resources",
                "delete",
                self.a.name,
                *self.where(),
                "--force",
                "--quiet",
            ]
        )


STEPS = {
    "create": ["create"],
    "copy": ["copy"],
    "install": ["install"],
    "up": ["create", "copy", "install"],
    "run": ["run"],
    "all": ["create", "copy", "install", "run"],
    "logs": ["logs"],
    "delete": ["delete"],
}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=sorted(STEPS))
    ap.add_argument("args", nargs="*", help="after --: arguments of `r1jax` (run, all)")
    ap.add_argument("--name", required=True, help="queued resource and node name")
    ap.add_argument("--zone", required=True)
    ap.add_argument("--project", default=None)
    ap.add_argument("--accelerator", default="v5p-8", help="gcloud accelerator type, e.g. v5p-4096, v6e-256")
    ap.add_argument("--slices", type=int, default=1, help="slices over DCN (multi-slice)")
    ap.add_argument("--runtime", default=None, help="TPU VM runtime version (default per family)")
    ap.add_argument("--spot", action="store_true")
    ap.add_argument("--reserved", action="store_true")
    ap.add_argument("--git-url", default=None, help="clone this on the workers instead of copying this checkout")
    ap.add_argument("--git-ref", default="main")
    ap.add_argument("--detach", action="store_true", help="run: leave the job running (nohup)")
    ap.add_argument("--logs-dir", default="logs")
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--poll-s", type=float, default=30.0)
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    if args.step in ("run", "all") and not args.args:
        ap.error(f"{args.step}: give the r1jax arguments after --, e.g. -- train --preset r1")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    pod = Pod(args)
    for step in STEPS[args.step]:
        getattr(pod, step)()
    return 0


if __name__ == "__main__":
    sys.exit(main())
