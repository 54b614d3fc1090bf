"""Small helpers shared by the kernel families: backend choice and padding."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

NUM_LANES = 128
NUM_SUBLANES = 8
# Shared memory one Triton program (CUDA block) may use on H100/H200 (sm_90: 227 KiB opt-in).
GPU_SMEM_LIMIT = 232448


def resolve_interpret(interpret: bool | None) -> bool:
    """`None` means: interpret on CPU, compile on TPU/GPU."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    return bool(interpret)


def per_platform(run, *args):
    """``run(*args, interpret=..., kind=...)`` with the kernel chosen when the program is lowered, not when it is
    traced: the TPU kernel interpreted on CPU, compiled by Mosaic on TPU, the Triton kernel on GPU. A program traced on
    a CPU host and compiled for a TPU topology (``tools/aot_compile.py``) thus gets the Mosaic kernels; only the
    lowering platform's branch is lowered."""
    gpu = partial(run, interpret=False, kind="gpu")
    return jax.lax.platform_dependent(
        *args,
        cpu=partial(run, interpret=True, kind="tpu"),
        cuda=gpu,
        rocm=gpu,
        default=partial(run, interpret=False, kind="tpu"),
    )


def resolve_kind(kind: str | None, interpret: bool) -> str:
    """Which kernel style to run: "tpu" (Mosaic, grid accumulation) or "gpu" (Triton, in-kernel loops).

    Interpret mode on CPU runs the TPU kernels unless a kind is forced (tests force "gpu" to check the
    Triton kernels' math on CPU).
    """
    if kind is not None:
        if kind not in ("tpu", "gpu"):
            raise ValueError(f"kind must be 'tpu' or 'gpu', got {kind!r}")
        return kind
    backend = jax.default_backend()
    if backend == "gpu" and not interpret:
        return "gpu"
    return "tpu"


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """Pads `x` along `axis` up to `size` with `value` (no-op when already that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def pow2_chunks(d: int) -> tuple[tuple[int, int], ...]:
    """Splits a head dim into aligned power-of-two (offset, size) chunks, e.g. 192 -> (0,128),(128,64).

    Triton tiles must be powers of two; the binary decomposition keeps every chunk aligned to its size,
    so each chunk is one block of a BlockSpec over the last axis and no FLOPs are spent on padding.
    """
    chunks, off = [], 0
    for bit in reversed(range(d.bit_length())):
        size = 1 << bit
        if d & size:
            chunks.append((off, size))
            off += size
    return tuple(chunks)


def pick_num_stages(estimate, preferred: int = 3, limit: int = GPU_SMEM_LIMIT) -> int:
    """The deepest software pipeline (<= preferred, >= 1) whose estimated shared memory `estimate(stages)` fits."""
    for stages in range(preferred, 1, -1):
        if estimate(stages) <= limit:
            return stages
    return 1
