"""Per-host sharded loading measured: ``r1jax.load`` of a V3-style fp8 checkpoint in one process, and in each of two
processes (4 CPU devices each, one fsdp x expert mesh over both, gloo), each process a child whose peak RSS is its
own ``VmHWM`` (``peak_rss.own_peak_rss``). The checkpoint is ``tools/bench_checkpoint.py``'s (numpy-generated, ~0.7B
parameters by default):

    python tools/bench_load.py                      # /tmp/r1jax-bench-ckpt/hf_fp8 (generated when missing)
    python tools/bench_load.py --layers 2 --experts 8
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = r"""
import json, sys, time
import jax
from peak_rss import own_peak_rss
pid, n, port, path, dtype = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
if n > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=n, process_id=pid)
import r1jax
from r1jax.sharding import make_mesh
mesh = make_mesh({"fsdp": 4, "expert": 2}) if n > 1 else None
t0 = time.perf_counter()
model = r1jax.load(path, mesh=mesh, dtype=dtype)
jax.block_until_ready(model.param_dict())
held = sum(s.data.nbytes for a in jax.tree.leaves(model.param_dict()) for s in a.addressable_shards)
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss": own_peak_rss(), "held": held}))
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def measure(path: str, processes: int, dtype: str) -> list[dict]:
    """One row per process: load seconds, peak RSS, bytes of parameters it holds."""
    devices = 4 if processes > 1 else 1
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = os.pathsep.join([HERE, env.get("PYTHONPATH", "")])
    port = str(_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(pid), str(processes), port, path, dtype],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for pid in range(processes)
    ]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a load failed: {[p.returncode for p in procs]}")
    return [json.loads(out.strip().splitlines()[-1]) for out in outs]


def main() -> None:
    sys.path.insert(0, HERE)
    from bench_checkpoint import v3_config, write_fp8_checkpoint

    from r1jax import hf
    from r1jax.model import param_specs
    from r1jax.param_source import nbytes

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/r1jax-bench-ckpt")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    src = os.path.join(args.dir, "hf_fp8")
    hf_cfg = v3_config(hidden=args.hidden, layers=args.layers, experts=args.experts, vocab=args.vocab)
    meta = os.path.join(src, "bench.json")
    if not (os.path.exists(meta) and json.loads(Path(meta).read_text())["config"] == hf_cfg):
        t0 = time.time()
        n = write_fp8_checkpoint(src, hf_cfg)
        Path(meta).write_text(json.dumps({"config": hf_cfg, "params": n}))
        print(f"generated {src}: {n / 1e9:.3f}B parameters in {time.time() - t0:.1f}s", file=sys.stderr)
    f32 = nbytes(param_specs(hf.config_from_hf(hf_cfg)), "float32")  # the main model, as r1jax.load holds it
    gb = 1 << 30
    print(f"checkpoint {src}: {f32 / 4 / 1e9:.3f}B parameters (main model), float32 {f32 / gb:.2f} GiB\n")
    print(f"| load ({args.dtype}) | process | time (s) | peak RSS (GiB) | parameters held (GiB) |")
    print("|---|---|---|---|---|")
    rows = {}
    for n in (1, 2):
        rows[n] = measure(src, n, args.dtype)
        for pid, r in enumerate(rows[n]):
            where = "1 process, 1 device" if n == 1 else f"{pid} of 2 (4 devices each, fsdp=4 x expert=2)"
            print(f"| {where} | {pid} | {r['seconds']:.1f} | {r['peak_rss'] / gb:.2f} | {r['held'] / gb:.2f} |")
    print(json.dumps({"f32_bytes": f32, "rows": {str(k): v for k, v in rows.items()}}))


if __name__ == "__main__":
    main()
