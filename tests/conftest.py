"""Test setup: CPU with 8 fake devices, LLVM at -O0, float32 matmuls, compiled programs released after each module.

Every compiled CPU program holds a few memory maps. A pytest worker that kept every program of its share of the
suite went past the kernel's limit of 65530 maps per process, and XLA then segfaulted compiling or serialising the
next program, taking the worker and the rest of its file down (and xdist's loadfile scheduler waited forever). So
``jax.clear_caches()`` runs after each module.

JAX's persistent compilation cache is on, in ``.cache/jax-tests`` (``R1JAX_TEST_JAX_CACHE=DIR`` moves it), through
the environment so that the trainers and hosts the tests spawn share it: many tests build the same programs afresh
(a resumed run compiles what the uninterrupted run compiled, a subprocess what its parent did), and on a fresh clone
this saves most of those compiles; a rerun saves nearly all. The cache is capped at 4 GB (least recently used go).
"""

import gc
import os
from pathlib import Path

_CACHE = os.environ.get("R1JAX_TEST_JAX_CACHE") or str(Path(__file__).resolve().parents[1] / ".cache" / "jax-tests")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LLVM at -O0: the suite's programs are tiny, so compiling them is most of its time; -O0 compiles ~2x faster and the
# XLA-level passes (fusion, layout, sharding), which fix what is computed, still run as in a real run
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"]
)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the CLI commands the tests call in this process leave glibc's allocator alone (tests/test_host_memory.py tests it)
os.environ.setdefault("R1JAX_HOST_MEMORY", "default")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("R1JAX_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or R1JAX_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    yield
    jax.clear_caches()
    gc.collect()
