"""The ``make demo`` pipeline end to end at toy size: data generation, cold-start SFT of a V3-style model, GRPO,
rejection sampling, SFT of a dense student, evaluation of every stage, summary and reports. It checks that the stages
connect and the outputs exist, not the demo's learning targets (those need the full-size run)."""

from __future__ import annotations

import json

import pytest

from r1jax.config import RewardConfig
from r1jax.demo import DemoPlan, addition_trace, make_addition_data, run_demo
from r1jax.rewards.format import format_strict

TINY_TEACHER = ("model.d_model=32", "model.ffw=64", "model.moe_ffw=32", "model.n_layers=2", "model.q_lora_rank=16")
SHORT = ("grpo.max_completion_len=16", "sampling.max_new_tokens=16")


def test_addition_trace_is_column_addition_in_r1_format():
    assert addition_trace(347, 285) == "<think>7+5=12 4+8+1=13 3+2+1=6</think> <answer>632</answer>"
    assert addition_trace(999, 1) == "<think>9+1=10 9+0+1=10 9+0+1=10</think> <answer>1000</answer>"
    assert format_strict(addition_trace(123, 456), {}, RewardConfig()) == 1.0


def test_addition_splits_are_disjoint_and_deterministic(tmp_path):
    make_addition_data(tmp_path / "a", n_train=300, n_test=50, seed=3)
    make_addition_data(tmp_path / "b", n_train=300, n_test=50, seed=3)
    for split in ("train", "test"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_text() == (tmp_path / "b" / f"{split}.jsonl").read_text()

    def problems(split):
        rows = [json.loads(x) for x in (tmp_path / "a" / f"{split}.jsonl").read_text().splitlines()]
        return {tuple(sorted(int(t.strip("?")) for t in r["prompt"].split() if t.strip("?").isdigit())) for r in rows}

    train, test = problems("train"), problems("test")
    assert len(train) == 300 and len(test) == 50 and not train & test


def test_demo_pipeline_end_to_end(tmp_path):
    plan = DemoPlan(
        sft_steps=3,
        grpo_steps=2,
        distill_steps=2,
        n_train=200,
        n_test=8,
        eval_batch=8,
        distill_prompts=4,
        distill_samples=2,
        distill_keep="all",  # a 3-step model solves nothing yet; keep every sample so the student still trains
        overrides=(
            *(("sft", kv) for kv in TINY_TEACHER + SHORT),
            *(("grpo", kv) for kv in SHORT + ("grpo.prompts_per_step=4", "grpo.group_size=4")),
            *(("distill", kv) for kv in ("model.d_model=32", "model.ffw=64", "model.n_layers=1") + SHORT),
        ),
    )
    lines = []
    summary = run_demo(tmp_path / "demo", 15.0, plan=plan, progress=False, log=lines.append)

    on_disk = json.loads((tmp_path / "demo" / "summary.json").read_text())
    for key in ("sft_pass@1", "grpo_pass@1", "distill_pass@1", "minutes"):
        assert key in on_disk and key in summary
    for key in ("sft_pass@1", "grpo_pass@1", "distill_pass@1"):
        assert 0.0 <= on_disk[key] <= 1.0
    for stage in ("sft", "grpo", "distill"):
        assert on_disk["stages"][stage]["eval"]["n_problems"] == 8
        assert (tmp_path / "demo" / stage / "report" / "summary.md").exists()
        assert (tmp_path / "demo" / stage / "metrics.jsonl").exists()
    assert on_disk["stages"]["grpo"]["steps"] == 2
    assert on_disk["stages"]["distill"]["rejection_sampling"]["kept"] == 8  # 4 prompts x 2 samples, all kept
    assert (tmp_path / "demo" / "report.md").exists() and (tmp_path / "demo" / "pass_at_1.png").exists()
    assert "GRPO over SFT" in lines[-1] or any("GRPO over SFT" in x for x in lines)


def test_seeds_table_reports_each_seed_mean_and_min(tmp_path, monkeypatch):
    import r1jax.demo as demo
    from r1jax.report import machine

    got = {0: (0.60, 0.75, 0.40), 1: (0.55, 0.64, 0.35), 2: (0.70, 0.83, 0.45)}  # sft, grpo, distill

    def fake_run(out, budget, *, plan, progress, log):
        sft, grpo, distill = got[plan.seed]
        return {"sft_pass@1": sft, "grpo_pass@1": grpo, "distill_pass@1": distill,
                "grpo_gain_points": 100 * (grpo - sft), "minutes": 9.0 + plan.seed, "machine": machine()}  # fmt: skip

    monkeypatch.setattr(demo, "run_demo", fake_run)
    s = demo.run_seeds(tmp_path, [0, 1, 2], plan=DemoPlan(), log=lambda _: None)
    gain = s["table"]["grpo_gain_points"]
    assert gain["min"] == pytest.approx(9.0) and gain["mean"] == pytest.approx((15 + 9 + 13) / 3)
    assert s["table"]["sft_pass@1"]["mean"] == pytest.approx(0.6166666, rel=1e-5)
    assert s["every_seed_meets_target"] is False  # seed 1 gains 9 points
    on_disk = json.loads((tmp_path / "seeds.json").read_text())
    assert on_disk["table"]["grpo_pass@1"]["per_seed"] == {"0": 0.75, "1": 0.64, "2": 0.83}
    md = (tmp_path / "seeds.md").read_text()
    assert "| 1 | 55.0% | 64.0% | 35.0% | +9.0 | 10.0 |" in md and "not met" in md
    m = s["machine"]
    assert m["cpus"] >= 1 and m["cpu_model"] and m["versions"]["jax"] and m["versions"]["numpy"]


def test_seeds_flag_errors(capsys):
    from r1jax.cli import main

    with pytest.raises(SystemExit) as e:
        main(["demo", "--seeds", "0,0"])
    assert e.value.code == 2 and "distinct seeds" in capsys.readouterr().err
    assert main(["demo", "--task", "search", "--seeds", "0,1"]) == 2
    assert "--seeds runs the addition demo" in capsys.readouterr().err
    assert main(["demo", "--model", "smollm2"]) == 2  # the addition demo has one model
    assert "--model picks the search demo's model" in capsys.readouterr().err
