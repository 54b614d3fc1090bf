"""A process pool for untrusted reward evaluation: per-task wall-clock timeouts, a per-worker memory bound, and
replacement of workers that hang or die.

Workers are started with the ``forkserver`` method (``spawn`` where it is unavailable), never plain ``fork``: the
parent holds JAX's threads and device state, which a forked child must not inherit. Each worker bounds its address
space with ``resource.setrlimit(RLIMIT_AS)`` to its size after imports plus ``memory_mb``; a ``MemoryError`` is
reported like any other exception. Processes a worker starts inherit that bound as a ceiling: the code reward's
sandboxes (``r1jax.sandbox``, started with vfork/exec, which needs no address space of its own) lower it to
their own limit. A task that overruns its deadline gets its worker killed (SIGKILL) and replaced;
so does a worker that dies (segfault, OOM kill).

As with any non-fork start method, workers re-import the parent's ``__main__`` module: a script that starts a pool
needs the ``if __name__ == "__main__":`` guard. Workers import ``r1jax.rewards`` (and with it the ``r1jax`` package)
once, in the fork server, before their memory bound is set.

``concurrent.futures`` is not used: a dead worker breaks the whole executor there, and a running task cannot be
cancelled.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from r1jax.rewards.outcome import Scored

OK, ERROR, TIMEOUT, CRASH = "ok", "error", "timeout", "crash"
_PRELOAD = ["r1jax.rewards", "math_verify"]  # imported before the memory bound and in the fork server


def _limit_memory(memory_mb: int) -> None:
    try:
        import resource

        with open("/proc/self/statm") as f:
            vm_bytes = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = vm_bytes + memory_mb * (1 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, OSError, ValueError):  # no /proc or no RLIMIT_AS (not Linux): timeouts still apply
        pass


def _worker_main(conn: Connection, memory_mb: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    for module in _PRELOAD:
        __import__(module)
    _limit_memory(memory_mb)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, fn, args = msg
        try:
            value = fn(*args)
            result = (task_id, OK, value if isinstance(value, Scored) else float(value))
        except BaseException as e:  # any failure of untrusted evaluation is a scored error
            result = (task_id, ERROR, f"{type(e).__name__}: {str(e)[:200]}")
        try:
            conn.send(result)
        except (OSError, ValueError):
            return


class _Worker:
    def __init__(self, ctx: Any, memory_mb: int):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, memory_mb), daemon=True)
        self.proc.start()
        child.close()

    def kill(self) -> None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


def _context() -> Any:
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return mp.get_context("spawn")


class RewardPool:
    """``num_workers`` long-lived worker processes. Use as a context manager or call ``close()``."""

    def __init__(self, num_workers: int, memory_mb: int = 1024):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.memory_mb = memory_mb
        self._ctx = _context()
        self._workers: list[_Worker] = []
        self.restarts = 0

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.memory_mb)

    def run(
        self, tasks: Sequence[tuple[Callable[..., float], tuple[Any, ...]]], timeout_s: float | Sequence[float]
    ) -> list[tuple[str, Any]]:
        """Evaluate ``fn(*args)`` for every task; returns ``(status, value)`` per task in order. status is "ok"
        (value: float, or the ``Scored`` the function returned), "error" (value: message), "timeout" or "crash"
        (value: None). ``timeout_s`` is one deadline for all tasks or one per task; a task's deadline starts when
        a worker receives it."""
        timeouts = [float(timeout_s)] * len(tasks) if isinstance(timeout_s, int | float) else list(timeout_s)
        if len(timeouts) != len(tasks):
            raise ValueError(f"{len(timeouts)} timeouts for {len(tasks)} tasks")
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())
        results: list[tuple[str, Any] | None] = [None] * len(tasks)
        pending = collections.deque(range(len(tasks)))
        idle = list(self._workers)
        busy: dict[Connection, tuple[_Worker, int, float]] = {}

        def replace(w: _Worker) -> _Worker:
            w.kill()
            new = self._spawn()
            self._workers[self._workers.index(w)] = new
            self.restarts += 1
            return new

        while pending or busy:
            while idle and pending:
                w, i = idle.pop(), pending.popleft()
                fn, args = tasks[i]
                try:
                    w.conn.send((i, fn, args))
                except (OSError, ValueError):  # worker died while idle: retry the task on a fresh one
                    pending.appendleft(i)
                    idle.append(replace(w))
                    continue
                busy[w.conn] = (w, i, time.monotonic() + timeouts[i])
            if not busy:
                continue
            now = time.monotonic()
            next_deadline = min(d for _, _, d in busy.values())
            for conn in wait(list(busy), timeout=max(0.0, next_deadline - now)):
                w, i, _ = busy.pop(conn)
                try:
                    task_id, status, value = conn.recv()
                except (EOFError, OSError):
                    results[i] = (CRASH, None)
                    idle.append(replace(w))
                    continue
                results[i] = (status, value) if task_id == i else (CRASH, None)
                idle.append(w)
            now = time.monotonic()
            for conn, (w, i, deadline) in list(busy.items()):
                if now >= deadline:
                    del busy[conn]
                    results[i] = (TIMEOUT, None)
                    idle.append(replace(w))
        return [r if r is not None else (CRASH, None) for r in results]

    def close(self) -> None:
        for w in self._workers:
            with contextlib.suppress(OSError, ValueError):
                w.conn.send(None)
        for w in self._workers:
            w.proc.join(timeout=2)
            if w.proc.is_alive():
                w.kill()
            else:
                w.conn.close()
        self._workers = []

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
