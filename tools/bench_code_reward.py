"""Throughput of the sandboxed ``code`` reward: HumanEval's 164 canonical solutions through the reward pool.

    JAX_PLATFORMS=cpu python tools/bench_code_reward.py [--workers 2] [--repeats 3]

Prints one JSON line per repeat (seconds, programs/s, pass rate) and the machine (CPU model, cores, load average).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from r1jax.config import RewardConfig
    from r1jax.data.datasets import load_dataset
    from r1jax.rewards import RewardPool, Scorer

    with tempfile.TemporaryDirectory() as data_dir:
        data = load_dataset("humaneval", "test", data_dir=data_dir)
        problems = [data[i] for i in range(len(data))]
    cfg = RewardConfig(functions=("code",), weights=(1.0,), num_workers=args.workers)
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    with RewardPool(args.workers, cfg.memory_mb) as pool:
        scorer = Scorer(cfg, pool=pool)
        scorer.score([problems[0]["solution"]] * args.workers, problems[:1] * args.workers)  # start and probe
        for _ in range(args.repeats):
            t0 = time.monotonic()
            rewards, _ = scorer.score([p["solution"] for p in problems], problems)
            seconds = time.monotonic() - t0
            row = {
                "programs": len(problems),
                "passed": int(rewards.sum()),
                "seconds": round(seconds, 2),
                "programs_per_s": round(len(problems) / seconds, 2),
                "workers": args.workers,
                "cpu": cpu,
                "cores": os.cpu_count(),
                "load_avg_1m": os.getloadavg()[0],
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
