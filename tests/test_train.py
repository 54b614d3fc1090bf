"""The training loop: exact resume, SIGTERM/SIGKILL, determinism, non-finite steps, config overrides, run dirs."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import r1jax
from r1jax import train
from r1jax.data.tokenizer import for_model
from r1jax.errors import ConfigError

FAST = [
    "steps=4",
    "checkpoint.every=1",
    "checkpoint.keep=10",
    "data.template=plain",
    "data.options=train_size=64,test_size=8",  # not the generator's 50,000: each run reads every prompt once
    "data.max_prompt_tokens=384",
    "rewards.num_workers=0",
    "grpo.ref_update_every=3",  # a resume at step 2 must still refresh the reference at step 3
]


@pytest.fixture(autouse=True)
def _tfds_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path_factory.getbasetemp() / "tfds"))


def _cfg(*extra):
    return train.apply_overrides(train.load_config("tiny_text"), FAST + list(extra))


def _params(run_dir):
    return jax.tree.map(np.asarray, r1jax.load(str(run_dir)).param_dict())


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 4-step run (with its metrics)."""
    os.environ["TFDS_DATA_DIR"] = str(tmp_path_factory.getbasetemp() / "tfds")
    out = tmp_path_factory.mktemp("ref") / "run"
    train.run(_cfg(), str(out), progress=False)
    return out


def test_run_dir_layout_and_metrics(reference_run):
    lines = [json.loads(x) for x in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert all("reward/mean" in m and "kl" in m and "grad_norm" in m for m in lines)
    assert (reference_run / "tb").is_dir() and any((reference_run / "tb").iterdir())
    model = r1jax.load(str(reference_run))
    assert model.cfg.vocab_size == 320


def test_eval_during_training(tmp_path):
    """``eval.every``: held-out metrics at step 0, every N steps and at the end, computed on the parameters of
    that step (re-evaluating the saved final checkpoint gives the logged numbers)."""
    cfg = _cfg("eval.every=3", "eval.limit=3", "eval.batch_size=2", "eval.max_new_tokens=8")
    out = tmp_path / "run"
    train.run(cfg, str(out), progress=False)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {m["step"]: m for m in lines if "eval/pass@1" in m}
    assert sorted(evals) == [0, 3, 4] and [m["step"] for m in lines] == [0, 1, 2, 3, 4]
    model = r1jax.load(str(out))
    tok = for_model(model.cfg, model.tokenizer_files, byte_fallback=True)
    again = train.Evaluator(cfg, model.cfg, tok)(model.param_dict())
    for key in ("eval/pass@1", "eval/length_mean", "eval/truncated_frac", "eval/answered_frac"):
        assert again[key] == evals[4][key], key
    assert 1 <= evals[4]["eval/length_mean"] <= 8


def test_resume_is_exact(reference_run, tmp_path):
    out = tmp_path / "run"
    train.run(_cfg(), str(out), progress=False, max_steps=2)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    train.run(_cfg(), str(out), progress=False)
    _assert_same(_params(out), _params(reference_run))
    ref_lines = (reference_run / "metrics.jsonl").read_text().splitlines()
    got_lines = (out / "metrics.jsonl").read_text().splitlines()
    strip = lambda ls: [{k: v for k, v in json.loads(x).items() if not k.startswith(("perf/", "time/"))} for x in ls]  # noqa: E731
    assert strip(got_lines) == strip(ref_lines)


def test_resume_never_reads_the_start_point(reference_run, tmp_path, monkeypatch):
    """A resumed run restores its newest step into its start point's shapes and shardings without reading the start
    point's parameters (at scale those would sit in memory beside the restored ones). Started from a checkpoint of
    the reference run's random initialisation, it ends with the reference run's parameters."""
    from r1jax import checkpoint, param_source
    from r1jax.model import Transformer

    cfg = _cfg()
    checkpoint.save(Transformer.random(cfg.model, cfg.seed), str(tmp_path / "init"))
    out = tmp_path / "run"
    train.run(_cfg(f"init={tmp_path / 'init'}"), str(out), progress=False, max_steps=2)

    def no_reads(*a, **k):
        raise AssertionError("the start point was read on resume")

    monkeypatch.setattr(param_source.ParamSource, "read", no_reads)
    train.run(_cfg(f"init={tmp_path / 'init'}"), str(out), progress=False)
    _assert_same(_params(out), _params(reference_run))


def test_same_seed_is_bitwise_identical(reference_run, tmp_path):
    train.run(_cfg(), str(tmp_path / "again"), progress=False)
    _assert_same(_params(tmp_path / "again"), _params(reference_run))


def test_damaged_newest_checkpoint_is_skipped(reference_run, tmp_path):
    out = tmp_path / "run"
    train.run(_cfg(), str(out), progress=False, max_steps=3)
    newest = out / "checkpoints" / "3" / "params"
    for f in newest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0" * f.stat().st_size)
    with pytest.warns(UserWarning, match="step 3"):
        train.run(_cfg(), str(out), progress=False)
    _assert_same(_params(out), _params(reference_run))


def _spawn(out, *extra):
    cmd = [sys.executable, "-m", "r1jax", "train", "tiny_text", "--out", str(out), "--no-progress"]
    cmd += [a for s in FAST + list(extra) for a in ("--set", s)]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu")
    )


def _wait_for_step(out, proc, n, timeout=900):  # a bound on a stall, not a speed check: CI machines vary 3x
    t0 = time.time()
    while time.time() - t0 < timeout:
        path = out / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    raise AssertionError("no progress")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_resumes_to_the_same_parameters(reference_run, tmp_path, sig):
    out = tmp_path / "run"
    proc = _spawn(out)
    _wait_for_step(out, proc, 1)
    t0 = time.time()
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    if sig == signal.SIGTERM:
        assert code == train.SIGTERM_EXIT and time.time() - t0 < 30
        assert "saved step" in proc.stderr.read()
    else:
        assert code == -signal.SIGKILL
    again = _spawn(out)
    assert again.wait(timeout=300) == 0, again.stderr.read()[-2000:]
    _assert_same(_params(out), _params(reference_run))


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    out = tmp_path / "run"
    # an absurd learning rate makes the parameters overflow after the first update; every later step is non-finite
    cfg = _cfg("optim.lr=1e38", "max_consecutive_skips=2", "steps=6")
    with pytest.raises(train.TrainingError, match="2 consecutive steps with non-finite"):
        train.run(cfg, str(out), progress=False)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["skipped_steps"] == 2
    assert (out / "checkpoints" / "1").is_dir()


def test_overrides_are_type_checked():
    cfg = train.apply_overrides(
        train.load_config("tiny_text"),
        ["grpo.group_size=2", "rewards.functions=countdown", "rewards.weights=1.0", "init=none"],
    )
    assert cfg.grpo.group_size == 2 and cfg.rewards.functions == ("countdown",) and cfg.init is None
    with pytest.raises(ConfigError, match="did you mean 'grpo.group_size'"):
        train.apply_overrides(cfg, ["grpo.group_sise=4"])
    with pytest.raises(ConfigError, match="not a valid int"):
        train.apply_overrides(cfg, ["grpo.group_size=four"])
    with pytest.raises(ConfigError, match="one of grpo, dapo, dr_grpo"):
        train.apply_overrides(cfg, ["grpo.loss_agg=ppo"])
    with pytest.raises(ConfigError, match="unknown config 'tiny_txt'; did you mean 'tiny_text'"):
        train.load_config("tiny_txt")


def test_unwritable_output_fails_at_start(tmp_path, capsys):
    from r1jax.cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert main(["train", "tiny_text", "--out", str(blocker / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("r1jax: error:") and "not writable" in err and len(err.splitlines()) == 1


def test_changed_config_on_resume_is_refused(reference_run):
    with pytest.raises(ConfigError, match="different config"):
        train.run(_cfg("optim.lr=0.5"), str(reference_run), progress=False)


def test_sft_stage_learns_and_loads(tmp_path):
    """Cold-start SFT on GSM8K worked solutions (byte tokenizer, tiny model): the loss falls; the run loads."""
    from r1jax.data.datasets import default_gsm8k_dir

    if not default_gsm8k_dir().exists():
        pytest.skip("shared/data/gsm8k is not available")
    cfg = train.apply_overrides(
        train.load_config("tiny_text"),
        [
            "stage=sft",
            "data.name=gsm8k",
            "data.template=plain",
            "data.seq_len=384",
            "sft_batch_size=4",
            "micro_batch_size=2",
            "steps=16",
            "optim.lr=0.01",
            "checkpoint.every=6",
        ],
    )
    train.run(cfg, str(tmp_path / "sft"), progress=False)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert r1jax.load(str(tmp_path / "sft")).cfg.vocab_size == 320


def test_sft_pack_trains_the_same_examples_in_fewer_rows(tmp_path):
    """``sft_pack`` packs a step's examples into fewer rows: the same batches, the same losses, half the rows."""
    rows = [
        {"prompt": f"What is {a} + {b}?", "completion": f"<answer>{a + b}</answer>"} for a in range(4) for b in (1, 2)
    ]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {}
    for pack in (0, 2):
        cfg = train.apply_overrides(
            train.load_config("tiny_text"),
            ["stage=sft", f"data.name={tmp_path / 'data'}", "data.template={prompt}", "data.seq_len=128",
             "sft_batch_size=4", f"sft_pack={pack}", "micro_batch_size=0", "steps=2", "optim.lr=0.01"],
        )  # fmt: skip
        train.run(cfg, str(tmp_path / f"pack{pack}"), progress=False)
        runs[pack] = [json.loads(x) for x in (tmp_path / f"pack{pack}" / "metrics.jsonl").read_text().splitlines()]
    assert [m["rows"] for m in runs[0]] == [4, 4] and [m["rows"] for m in runs[2]] == [2, 2]
    assert [m["tokens"] for m in runs[0]] == [m["tokens"] for m in runs[2]]
    np.testing.assert_allclose([m["loss"] for m in runs[2]], [m["loss"] for m in runs[0]], rtol=1e-5)


def test_sft_pack_must_divide_into_micro_batches():
    with pytest.raises(ConfigError, match="multiple of micro_batch_size"):
        train.apply_overrides(train.load_config("tiny_text"), ["stage=sft", "sft_pack=3", "micro_batch_size=2"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "grpo.group_sise=4"], "did you mean 'grpo.group_size'"),
        (["--set", "steps=many"], "not a valid int"),
        (["--mesh", "fsdp=3"], "needs 3 devices, 8 available"),
        (["--set", "mesh=fsdp=3"], "needs 3 devices, 8 available"),  # the config's own mesh
        (["--mesh", "fsdp=2,model=4"], "unknown mesh axes"),
        (["--set", "micro_batch_size=3"], "must divide the mini-batch"),
        (["--set", "sampling.slots=2"], "is smaller than a group"),
        (["--set", "sampling.step_budget=4", "--set", "sampling.prompt_chunk=16"], "is below the prompt chunk"),
    ],
)
def test_cli_config_errors_are_one_line(tmp_path, capsys, argv, message):
    from r1jax.cli import main

    assert main(["train", "tiny_text", "--out", str(tmp_path / "run"), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("r1jax: error:") and message in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_out_of_disk_is_refused_at_start(tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1024))
    with pytest.raises(ConfigError, match="GiB free, checkpoints need about"):
        train.run(_cfg(), str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_tokenizer_model_vocab_mismatch_is_refused(tmp_path):
    from tests import hf_tiny

    hf_tiny.build("qwen2", str(tmp_path / "m"))  # vocab 96 and no tokenizer files: the byte tokenizer has 259
    cfg = train.apply_overrides(_cfg(), [f"init={tmp_path / 'm'}"])
    with pytest.raises(ConfigError, match="tokenizer has 259 tokens but the model's vocabulary is 96"):
        train.run(cfg, str(tmp_path / "run"), progress=False)
