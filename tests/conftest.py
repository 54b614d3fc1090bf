"""Test setup: CPU with 8 fake devices, float32 matmuls; JAX's persistent compilation cache only on request.

The persistent cache is off by default: writing some CPU executables to it (the Pallas kernels in interpret mode,
which call back into Python) crashes the process inside jaxlib (``put_executable_and_time``), which takes a pytest
worker and every test left in its file down with it. ``R1JAX_TEST_JAX_CACHE=DIR`` turns it on for local reruns.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

if os.environ.get("R1JAX_TEST_JAX_CACHE"):
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.environ["R1JAX_TEST_JAX_CACHE"]))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
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
