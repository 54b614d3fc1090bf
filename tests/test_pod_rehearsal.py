"""Pod rehearsal on localhost: 2 processes x 4 CPU devices run the ``r1jax`` command line as a pod's hosts do
(``--distributed``, one fsdp x expert mesh over both) with a scaled-down V3-style preset (MLA + MoE, expert-parallel
dispatch, f32 master parameters, bf16 matmuls, remat) from an fp8 HF checkpoint: cold-start SFT killed with SIGKILL
after its second checkpoint and resumed, then GRPO from the SFT run, then ``sample`` and ``eval`` of the GRPO run. The
same commands in one process with 8 devices give the same parameters (rel 1e-4), traces and eval metrics.

Slow: 9-10 minutes on 2 shared cores (every command compiles afresh in each process)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import r1jax

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from bench_checkpoint import v3_config, write_fp8_checkpoint  # noqa: E402
from test_sample_cmd import char_tokenizer_files  # noqa: E402

PRESET = """
from r1jax.config import (CheckpointConfig, DataConfig, GRPOConfig, ModelConfig, OptimConfig, RewardConfig,
                          SamplingConfig, TrainConfig)


def config():
    # the checkpoint's architecture; the run's numerics (what a TPU preset declares)
    model = ModelConfig(arch="deepseek_v3", vocab_size=64, d_model=64, n_layers=2, n_heads=8, ffw=176,
                        n_experts=8, experts_per_token=4, moe_ffw=32, dtype="bfloat16", param_dtype="float32",
                        remat=True, remat_policy="dots", dispatch_slack=2.0)
    return TrainConfig(
        model=model, stage="sft", steps=4, sft_batch_size=8, mesh="fsdp=4,expert=2",
        data=DataConfig(name=DATA + "/sft.jsonl", template="plain", seq_len=32, max_prompt_tokens=24),
        grpo=GRPOConfig(group_size=2, prompts_per_step=4, max_completion_len=8, kl_coef=0.01),
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=8),
        rewards=RewardConfig(functions=("accuracy",), weights=(1.0,), num_workers=0, gsm8k_last_number=True),
        optim=OptimConfig(lr=1e-3, router_bias_gamma=0.001),
        checkpoint=CheckpointConfig(every=1, keep=5, async_save=False),
    )
"""


def _problems(n: int, offset: int = 0) -> list[dict]:
    return [{"prompt": f"{a} + {a + 1} =", "answer": str(2 * a + 1), "task": "gsm8k"} for a in range(offset, n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pod")
    hf_cfg = v3_config(hidden=64, layers=2, experts=8, vocab=64)
    write_fp8_checkpoint(str(root / "fp8"), hf_cfg, shard_bytes=256 << 10)  # several shards + index, e4m3 blocks
    for name, text in char_tokenizer_files().items():
        (root / "fp8" / name).write_text(text)
    sft = [dict(p, completion=f" {p['answer']}") for p in _problems(16)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (root / "rl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _problems(24, 8)))
    (root / "preset.py").write_text(f"DATA = {str(root)!r}\n" + PRESET)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env | {"TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": ROOT}


def _launch(args: list[str], processes: int) -> list[subprocess.Popen]:
    """``r1jax ARGS`` as ``processes`` hosts of one job (4 devices each), or as one process with 8 devices."""
    cmd = [sys.executable, "-m", "r1jax", *args]
    if processes == 1:
        return [subprocess.Popen(cmd, env=_env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    port = _free_port()
    return [
        subprocess.Popen(
            [
                *cmd,
                "--distributed",
                "--coordinator",
                f"localhost:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(pid),
            ],
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for pid in range(processes)
    ]


def _wait(procs, timeout: float = 1500) -> str:
    outs = [p.communicate(timeout=timeout) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in outs]
    return outs[0][0]


def _killed_after_checkpoint(procs, run_dir, step: int, timeout: float = 1500) -> None:
    """SIGKILL every process once checkpoint ``step`` is complete (orbax renames it into place when it is)."""
    t0 = time.time()
    while not (run_dir / "checkpoints" / str(step) / "params").is_dir():
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-3000:] for p in procs]
        assert time.time() - t0 < timeout, "no checkpoint"
        time.sleep(0.2)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.communicate()
    done = sorted(int(d.name) for d in (run_dir / "checkpoints").iterdir() if d.name.isdigit())
    assert done[-1] < 4, done  # killed before the end: the rerun has steps left to resume


def _pipeline(setup, out, processes: int) -> dict:
    preset, fp8 = str(setup / "preset.py"), str(setup / "fp8")
    sft, rl = out / "sft", out / "grpo"
    sft_args = ["train", preset, "--out", str(sft), "--set", f"init={fp8}", "--no-progress"]
    if processes > 1:  # the pod loses its hosts after checkpoint 2 and the same command resumes
        _killed_after_checkpoint(_launch(sft_args, processes), sft, 2)
    _wait(_launch(sft_args, processes))
    rl_sets = ["stage=grpo", "steps=2", f"init={sft}", f"data.name={setup / 'rl.jsonl'}", "data.template=plain"]
    _wait(_launch(["train", preset, "--out", str(rl), "--no-progress", *(f"--set={s}" for s in rl_sets)], processes))
    common = ["--data", str(setup / "rl.jsonl"), "--template", "plain", "--max-new-tokens", "8", "--batch-size", "4",
              "--limit", "8", "--last-number"]  # fmt: skip
    traces = out / "traces.jsonl"
    _wait(_launch(["sample", str(rl), *common, "--samples", "2", "--keep", "all", "--out", str(traces)], processes))
    eval_out = _wait(_launch(["eval", str(rl), *common, "--k", "2"], processes))
    return {
        "sft_metrics": [json.loads(x) for x in (sft / "metrics.jsonl").read_text().splitlines()],
        "params": jax.tree.map(np.asarray, r1jax.load(str(rl)).param_dict()),
        "traces": [json.loads(x) for x in traces.read_text().splitlines()],
        "eval": json.loads(eval_out.strip().splitlines()[-1]),
        "train_config": json.loads((rl / "train_config.json").read_text()),
    }


@pytest.mark.slow
def test_pod_rehearsal_two_processes_equal_one(setup, tmp_path):
    pod = _pipeline(setup, tmp_path / "pod", processes=2)
    one = _pipeline(setup, tmp_path / "one", processes=1)
    assert [m["step"] for m in pod["sft_metrics"]] == [1, 2, 3, 4]  # resumed after the kill, nothing repeated
    np.testing.assert_allclose([m["loss"] for m in pod["sft_metrics"]], [m["loss"] for m in one["sft_metrics"]],
                               rtol=1e-4)  # fmt: skip
    model = pod["train_config"]["model"]
    assert (model["d_model"], model["n_experts"], model["dtype"], model["param_dtype"], model["remat"]) == (
        64, 8, "bfloat16", "float32", True,
    )  # fmt: skip
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(pod["params"]), jax.tree.leaves(one["params"]), strict=True
    ):
        assert a.dtype == np.float32
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max(), jax.tree_util.keystr(path)
    assert [t["completion"] for t in pod["traces"]] == [t["completion"] for t in one["traces"]]
    assert pod["eval"] == one["eval"]
