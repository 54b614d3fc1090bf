"""``retain_host_memory``: a worker thread's large temporaries stop costing page faults after the first step.

Each case runs in a fresh interpreter (the allocator's settings are per process and must come before the thread's
first allocation), where a worker thread mallocs, fills and frees a 256 MiB buffer per "step", as XLA:CPU does with an
execution's temporaries, and counts the minor page faults of the later steps.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")

_SCRIPT = r"""
import ctypes, json, resource, sys, threading
from r1jax.host_memory import retain_host_memory

took = retain_host_memory() if sys.argv[1] == "retain" else None
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size, faults = 256 << 20, []

def steps():
    for _ in range(4):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)

t = threading.Thread(target=steps)
t.start()
t.join()
print(json.dumps({"took": took, "faults": faults}))
"""


def _run(mode: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "R1JAX_HOST_MEMORY"}
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True, env={**env, **extra}
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_retained_memory_is_not_faulted_again():
    pages = (256 << 20) // os.sysconf("SC_PAGE_SIZE")
    plain = _run("plain")
    kept = _run("retain")
    assert kept["took"] is True
    # glibc's default: the thread's 256 MiB comes from its own mmap each step, so every step faults all its pages
    assert min(plain["faults"][1:]) > 0.9 * pages, plain
    # retained: the first step faults the pages in, the later ones reuse them
    assert kept["faults"][0] > 0.9 * pages, kept
    assert max(kept["faults"][1:]) < 0.02 * pages, kept


def test_opt_out_leaves_the_allocator_alone():
    pages = (256 << 20) // os.sysconf("SC_PAGE_SIZE")
    out = _run("retain", R1JAX_HOST_MEMORY="default")
    assert out["took"] is False
    assert min(out["faults"][1:]) > 0.9 * pages, out
