"""Peak resident memory of a process, measured so that a parent's memory does not leak into the figure.

On Linux ``getrusage(...).ru_maxrss`` is a high-water mark that survives ``exec``: a child started by a big process
(a pytest worker that has run other tests, say) reports at least the parent's peak, whatever the child itself did.
Two measurements avoid that:

- ``own_peak_rss()``: this process image's own high-water mark, ``VmHWM`` in ``/proc/self/status`` (``ru_maxrss``
  where there is no ``/proc``);
- ``measure(argv)``: runs ``argv`` as the grandchild of a small launcher (this file run as a script), so the mark it
  inherits is the launcher's few MB, and reads the grandchild's ``ru_maxrss`` through ``os.wait4``.

    python tools/peak_rss.py OUT.json CMD [ARG ...]    # runs CMD, writes {"peak_rss": bytes, "seconds": s} to OUT
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def own_peak_rss() -> int:
    """Bytes: the peak resident set of this process image (not of whatever started it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


def measure(argv: list[str], env: dict | None = None) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of ``argv`` run to completion; raises RuntimeError with its stderr tail on failure."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "peak.json")
        p = subprocess.run([sys.executable, os.path.abspath(__file__), out, *argv], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        if p.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.decode()[-2000:]}")
        with open(out) as f:
            r = json.load(f)
    return r["seconds"], r["peak_rss"]


def _launch(out: str, argv: list[str]) -> int:
    t0 = time.perf_counter()
    child = subprocess.Popen(argv)
    _, status, ru = os.wait4(child.pid, 0)
    child.returncode = code = os.waitstatus_to_exitcode(status)
    peak = ru.ru_maxrss if sys.platform == "darwin" else ru.ru_maxrss * 1024
    with open(out, "w") as f:
        json.dump({"peak_rss": peak, "seconds": time.perf_counter() - t0}, f)
    return code


if __name__ == "__main__":
    raise SystemExit(_launch(sys.argv[1], sys.argv[2:]))
