"""Python as a tool: the model's code runs in the same bubblewrap sandbox as the code reward
(``r1jax.sandbox.run_python``: no network, a private tmpfs, a PID namespace, rlimits, a wall-clock timeout, capped
output). The model reads the program's stdout; a program that fails also shows the tail of its stderr and a
``[status]`` line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from r1jax.tools.protocol import ToolOutput

STDERR_TAIL = 400  # characters of stderr shown to the model when the program fails


class SandboxedPython:
    """``__call__(code) -> ToolOutput``: runs ``code`` with ``run`` (default ``r1jax.sandbox.run_python``) under
    ``limits`` (default: the sandbox's own ``SandboxLimits``). ``error`` is None for exit status 0, else the
    sandbox's status: "error" (another exit status), "timeout", "killed", "output_limit"."""

    name = "python"

    def __init__(self, *, limits: Any = None, run: Callable[..., Any] | None = None):
        if run is None:
            from r1jax.sandbox import run_python as run
        self._run = run
        self._limits = limits

    def __call__(self, code: str) -> ToolOutput:
        kw = {} if self._limits is None else {"limits": self._limits}
        res = self._run(code, **kw)
        if res.status == "ok":
            return ToolOutput(res.stdout)
        status = res.status if res.returncode is None else f"{res.status} {res.returncode}"
        parts = [res.stdout.rstrip("\n"), res.stderr[-STDERR_TAIL:].rstrip("\n"), f"[{status}]"]
        return ToolOutput("\n".join(p for p in parts if p), error=res.status)
