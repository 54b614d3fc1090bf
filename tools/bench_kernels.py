"""Benchmark the Pallas kernels against XLA on whatever backend runs this script.

Reports TFLOP/s (flash attention forward / backward) and GB/s (MLA decode) for the kernel, the plain-jnp
reference compiled by XLA, and `jax.nn.dot_product_attention` where it accepts the shapes, next to a measured
bf16 matmul peak and copy bandwidth so the ratios mean something on this chip. Prints one JSON object per line
and a table at the end.

FLOP accounting (FlashAttention papers): forward 2 * b * h * t * s * (d_qk + d_v), halved when causal; backward
2.5x the forward (one recomputation of the scores).

    python tools/bench_kernels.py                 # realistic shapes (GPU/TPU); tiny shapes on CPU
    python tools/bench_kernels.py --tpu-aot       # also compile for TPU targets and print cost/memory analysis
    python tools/bench_kernels.py --json out.jsonl
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def _import_kernels():
    try:
        import r1jax.kernels as kernels

        return kernels
    except Exception:  # not installed: load the source folder
        root = pathlib.Path(__file__).resolve().parents[1] / "r1jax" / "kernels"
        spec = importlib.util.spec_from_file_location(
            "r1jax_kernels_src", root / "__init__.py", submodule_search_locations=[str(root)]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["r1jax_kernels_src"] = mod
        spec.loader.exec_module(mod)
        return mod


K = _import_kernels()
GPU_SMEM_LIMIT = getattr(sys.modules[K.BlockSizes.__module__], "GPU_SMEM_LIMIT", 232448)
ROWS: list[dict] = []


def _time(fn, *args, iters: int, warmup: int = 2) -> float:
    """Median seconds per call of a jitted fn (outputs blocked on)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


JSON_OUT: list = []  # an open file when --json is given: rows are appended as they come (a timeout keeps them)


def _emit(**row):
    ROWS.append(row)
    line = json.dumps(row)
    print(line, flush=True)
    for f in JSON_OUT:
        f.write(line + "\n")
        f.flush()


def bench_peaks(iters: int, small: bool):
    n = 1024 if small else 8192
    a = jnp.ones((n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    sec = _time(mm, a, a, iters=iters)
    _emit(name="matmul_bf16_peak", shape=[n, n, n], ms=sec * 1e3, tflops=2 * n**3 / sec / 1e12)
    m = (1 << 22) if small else (1 << 29)  # 1 GiB of bf16 on accelerators
    x = jnp.ones((m,), jnp.bfloat16)
    cp = jax.jit(lambda x: x * 2)
    sec = _time(cp, x, iters=iters)
    _emit(name="copy_bandwidth", bytes=2 * x.nbytes, ms=sec * 1e3, gbps=2 * x.nbytes / sec / 1e9)


def _flash_flops(b, t, s, h, dqk, dv, causal):
    return 2 * b * h * t * s * (dqk + dv) * (0.5 if causal else 1.0)


def _err(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    return f"{type(e).__name__}: {lines[0][:200]}"


def _bs_label(bs, fields=None) -> str:
    if bs is None:
        return "default"
    return ",".join(f"{k}={v}" for k, v in vars(bs).items() if v is not None and (fields is None or k in fields))


_FIELDS = {
    "fwd": ("block_q", "block_k", "num_warps", "num_stages"),
    "bwd": ("block_q_bwd", "block_k_bwd", "num_warps", "num_stages"),
}


def _flash_candidates(phase: str, dqk: int, dv: int, sweep: bool):
    """Block sizes to time: the default first, then a few alternatives (GPU only)."""
    if not sweep:
        return [None]
    B = K.BlockSizes
    default = B.default("gpu", dqk, dv)
    if phase == "fwd":
        alts = [
            B(block_q=128, block_k=128, num_warps=8, num_stages=2),  # the default when d_qk > 128
            B(block_q=64, block_k=64, num_warps=4, num_stages=3),  # the default when d_qk <= 128
            B(block_q=128, block_k=64, num_warps=8, num_stages=3),
        ]
        keys = ("block_q", "block_k")
    else:
        alts = [
            B(block_q_bwd=64, block_k_bwd=128, num_warps=8, num_stages=2),  # the default when d_qk > 128
            B(block_q_bwd=64, block_k_bwd=64, num_warps=4, num_stages=3),  # the default when d_qk <= 128
            B(block_q_bwd=64, block_k_bwd=64, num_warps=8, num_stages=3),
            B(block_q_bwd=128, block_k_bwd=64, num_warps=8, num_stages=2),
        ]
        keys = ("block_q_bwd", "block_k_bwd")
    fields = (*keys, "num_warps", "num_stages")
    same = lambda a: all(getattr(a, f) == getattr(default, f) for f in fields)  # noqa: E731
    # No duplicate of the default; backward tiles estimated past the shared-memory limit are skipped.
    fits = lambda a: phase == "fwd" or a.gpu_bwd_smem_bytes(dqk, dv) <= GPU_SMEM_LIMIT  # noqa: E731
    return [None, *(a for a in alts if not same(a) and fits(a))]


def _pure_bwd(fn, q, k, v):
    """A jitted backward alone (residuals computed once, outside the timing), or None if it cannot be built."""
    try:
        _, vjp = jax.vjp(fn, q, k, v)
        f = jax.jit(lambda vjp, do: vjp(do))
        return lambda do: f(vjp, do)
    except Exception:
        return None


def _time_bwd(fn, q, k, v, do, iters):
    """Seconds of the backward pass alone; falls back to (forward + backward) - forward."""
    pure = _pure_bwd(fn, q, k, v)
    if pure is not None:
        try:
            return _time(pure, do, iters=iters)
        except Exception:
            pass
    both = _time(jax.jit(lambda q, k, v, do: jax.vjp(fn, q, k, v)[1](do)), q, k, v, do, iters=iters)
    return max(both - _time(jax.jit(fn), q, k, v, iters=iters), 1e-9)


def bench_flash(iters: int, small: bool, interpret, sweep: bool, references: bool):
    """Pallas flash attention (every candidate block size when sweeping), then the XLA baselines."""
    b, t, h, hk, dqk, dv = (1, 256, 2, 2, 192, 128) if small else (2, 4096, 16, 16, 192, 128)
    cases = [("mla_192_128_causal", hk, dqk, dv, True), ("gqa_128_causal", max(1, h // 4), 128, 128, True)]
    for name, hkv, dq_, dv_, causal in cases:
        ks = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(ks[0], (b, t, h, dq_), jnp.bfloat16)
        k = jax.random.normal(ks[1], (b, t, hkv, dq_), jnp.bfloat16)
        v = jax.random.normal(ks[2], (b, t, hkv, dv_), jnp.bfloat16)
        do = jax.random.normal(ks[3], (b, t, h, dv_), jnp.bfloat16)
        flops = _flash_flops(b, t, t, h, dq_, dv_, causal)
        shape = dict(b=b, t=t, h=h, h_kv=hkv, d_qk=dq_, d_v=dv_, causal=causal)
        impls = {}
        if not references:
            for phase in ("fwd", "bwd"):
                for bs in _flash_candidates(phase, dq_, dv_, sweep):
                    impls[(phase, "pallas", _bs_label(bs, _FIELDS[phase]))] = lambda q, k, v, c=causal, bs=bs: (
                        K.flash_attention(q, k, v, causal=c, interpret=interpret, block_sizes=bs)
                    )
        else:
            for phase in ("fwd", "bwd"):
                impls[(phase, "xla_reference", "")] = lambda q, k, v, c=causal: K.flash_attention_reference(
                    q, k, v, causal=c
                )
                impls[(phase, "jax.nn.dot_product_attention", "")] = lambda q, k, v, c=causal: (
                    jax.nn.dot_product_attention(q, k, v, is_causal=c)
                )
        best = {}
        for (phase, impl, blocks), fn in impls.items():
            row = dict(name=f"flash_{phase}", case=name, impl=impl, blocks=blocks or None)
            try:
                if phase == "fwd":
                    sec, fl = _time(jax.jit(fn), q, k, v, iters=iters), flops
                else:
                    sec, fl = _time_bwd(fn, q, k, v, do, iters), 2.5 * flops
            except Exception as e:  # a tile config that does not fit, a shape an implementation rejects, ...
                _emit(**row, error=_err(e))
                continue
            _emit(**row, **shape, ms=sec * 1e3, tflops=fl / sec / 1e12)
            if impl == "pallas" and (phase not in best or sec < best[phase][0]):
                best[phase] = (sec, blocks, fl / sec / 1e12)
        for phase, (sec, blocks, tf) in best.items():
            _emit(name=f"flash_{phase}_best", case=name, impl="pallas", blocks=blocks, ms=sec * 1e3, tflops=tf)


def bench_decode(iters: int, small: bool, interpret, sweep: bool, references: bool):
    b, h, s, c, p = (4, 16, 512, 512, 64) if small else (64, 16, 8192, 512, 64)
    ks = jax.random.split(jax.random.key(1), 4)
    ql = jax.random.normal(ks[0], (b, h, c), jnp.bfloat16)
    qr = jax.random.normal(ks[1], (b, h, p), jnp.bfloat16)
    lat = jax.random.normal(ks[2], (b, s, c), jnp.bfloat16)
    rope = jax.random.normal(ks[3], (b, s, p), jnp.bfloat16)
    lengths = jnp.full((b,), s, jnp.int32)
    nbytes = lat.nbytes + rope.nbytes + ql.nbytes + qr.nbytes + b * h * c * 2
    impls = {}
    if references:
        impls[("xla_reference", "")] = lambda *a: K.mla_decode_reference(*a, sm_scale=0.04)
    else:
        D = K.MLADecodeBlockSizes
        # The default alone, or (sweep) the alternatives to it.
        cands = (
            [D(block_k=64, num_stages=2), D(block_k=32, num_stages=4), D(block_k=16, num_stages=4)] if sweep else [None]
        )
        for bs in cands:
            impls[("pallas", _bs_label(bs))] = lambda *a, bs=bs: K.mla_decode(
                *a, sm_scale=0.04, interpret=interpret, block_sizes=bs
            )
    for (impl, blocks), fn in impls.items():
        row = dict(name="mla_decode", impl=impl, blocks=blocks or None)
        try:
            sec = _time(jax.jit(fn), ql, qr, lat, rope, lengths, iters=iters)
        except Exception as e:
            _emit(**row, error=_err(e))
            continue
        _emit(**row, b=b, h=h, s=s, c=c, p=p, ms=sec * 1e3, gbps=nbytes / sec / 1e9)


def tpu_aot(targets):
    """Compiles the kernels for TPU topologies (needs libtpu) and reports XLA's cost and memory analyses."""
    from jax.experimental import topologies

    b, t, h, dqk, dv = 1, 4096, 16, 192, 128
    for target in targets:
        dev = topologies.get_topology_desc(target, platform="tpu").devices[0]
        spec = lambda shape, dt=jnp.bfloat16, dev=dev: jax.ShapeDtypeStruct(  # noqa: E731
            shape, dt, sharding=jax.sharding.SingleDeviceSharding(dev)
        )

        def fwd(q, k, v):
            return K.flash_attention(q, k, v, causal=True, interpret=False)

        def bwd(q, k, v, do):
            return jax.vjp(fwd, q, k, v)[1](do)

        def dec(*a):
            return K.mla_decode(*a, sm_scale=0.04, interpret=False)

        progs = {
            "flash_fwd": (fwd, (spec((b, t, h, dqk)), spec((b, t, h, dqk)), spec((b, t, h, dv)))),
            "flash_bwd": (bwd, (spec((b, t, h, dqk)), spec((b, t, h, dqk)), spec((b, t, h, dv)), spec((b, t, h, dv)))),
            "mla_decode": (
                dec,
                (
                    spec((64, 16, 512)),
                    spec((64, 16, 64)),
                    spec((64, 8192, 512)),
                    spec((64, 8192, 64)),
                    spec((64,), jnp.int32),
                ),
            ),
        }
        with jax.default_device(dev):
            for name, (fn, args) in progs.items():
                t0 = time.perf_counter()
                compiled = jax.jit(fn).lower(*args).compile()
                cost = compiled.cost_analysis() or {}
                cost = cost[0] if isinstance(cost, (list, tuple)) else cost
                mem = compiled.memory_analysis()
                _emit(
                    name=f"tpu_aot_{name}",
                    target=target,
                    device_kind=dev.device_kind,
                    compile_s=round(time.perf_counter() - t0, 2),
                    flops=cost.get("flops"),
                    bytes_accessed=cost.get("bytes accessed"),
                    temp_bytes=getattr(mem, "temp_size_in_bytes", None),
                    argument_bytes=getattr(mem, "argument_size_in_bytes", None),
                    output_bytes=getattr(mem, "output_size_in_bytes", None),
                )


def _table():
    peak = next((r["tflops"] for r in ROWS if r["name"] == "matmul_bf16_peak"), None)
    bw = next((r["gbps"] for r in ROWS if r["name"] == "copy_bandwidth"), None)
    print(f"\n{'benchmark':<34}{'impl':<30}{'ms':>10}{'TFLOP/s':>10}{'GB/s':>10}{'% peak':>9}")
    for r in ROWS:
        if "error" in r:
            label = r["name"] + (f"[{r['case']}]" if "case" in r else "")
            print(f"{label:<34}{r.get('impl', '')} {r.get('blocks') or ''}  ERROR {r['error'][:120]}")
            continue
        if "ms" not in r:
            continue
        label = r["name"] + (f"[{r['case']}]" if "case" in r else "")
        impl = r.get("impl", "") + (f" {r['blocks']}" if r.get("blocks") else "")
        ratio = ""
        if "tflops" in r and peak and r["name"] != "matmul_bf16_peak":
            ratio = f"{100 * r['tflops'] / peak:.1f}"
        elif "gbps" in r and bw and r["name"] != "copy_bandwidth":
            ratio = f"{100 * r['gbps'] / bw:.1f}"
        tf = f"{r['tflops']:.1f}" if "tflops" in r else ""
        gb = f"{r['gbps']:.0f}" if "gbps" in r else ""
        print(f"{label:<34}{impl:<30}{r['ms']:>10.3f}{tf:>10}{gb:>10}{ratio:>9}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--small", action="store_true", help="tiny shapes (default on CPU)")
    ap.add_argument("--tpu-aot", action="store_true", help="compile for TPU targets (needs libtpu)")
    ap.add_argument("--targets", default="v5e:2x2,v5p:2x2x1,v6e:2x2")
    ap.add_argument("--skip-run", action="store_true", help="only the --tpu-aot part")
    ap.add_argument("--json", default=None, help="also write the JSON lines here (as they come)")
    ap.add_argument("--no-sweep", action="store_true", help="GPU: time only the default block sizes")
    args = ap.parse_args(argv)
    backend = jax.default_backend()
    small = args.small or backend == "cpu"
    iters = args.iters or (2 if backend == "cpu" else 20)
    if args.json:
        JSON_OUT.append(open(args.json, "w"))  # noqa: SIM115  closed at exit
    _emit(name="env", backend=backend, devices=[d.device_kind for d in jax.devices()], jax=jax.__version__)
    sweep = not args.no_sweep and backend == "gpu"
    if not args.skip_run:
        interpret = None  # interpreted on CPU, compiled elsewhere
        # Most informative first, so a time limit cuts only the tail: the kernels, then the XLA baselines.
        for step in (
            lambda: bench_peaks(iters, small),
            lambda: bench_decode(iters, small, interpret, False, False),
            lambda: bench_flash(iters, small, interpret, sweep, False),
            lambda: bench_decode(iters, small, interpret, False, True),
            lambda: bench_flash(iters, small, interpret, False, True),
        ) + ((lambda: bench_decode(iters, small, interpret, True, False),) if sweep else ()):
            try:
                step()
            except Exception as e:  # keep going: one broken benchmark must not hide the others
                _emit(name="error", error=_err(e))
    if args.tpu_aot:
        tpu_aot(args.targets.split(","))
    _table()


if __name__ == "__main__":
    main()
