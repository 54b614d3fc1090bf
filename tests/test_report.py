"""``r1jax report``: plots per metric family and a summary table, from metrics files with NaNs, missing keys and a
truncated last line."""

import json
import math

import pytest

from r1jax import cli
from r1jax.report import family_of, read_metrics, write_report


def _write_run(tmp_path, n=60):
    lines = []
    for step in range(1, n + 1):
        rec = {
            "step": step,
            "reward/mean": step / n,
            "rewards/format_strict/mean": 0.5,
            "accuracy": min(1.0, step / 30),
            "response/length_mean": 100.0 + step,
            "loss": 1.0 / step,
            "grad_norm": float("nan") if step == 3 else 0.5,
            "perf/sample_s": 1.5,
            "note": "text values are ignored",
        }
        if step % 2:
            rec["kl"] = 0.01 * step  # present on odd steps only
        lines.append(json.dumps(rec))  # json writes NaN as a bare NaN token, which it reads back
    text = "\n".join(lines) + '\n\n[1, 2]\n{"step": 61, "reward/mean": 0.'  # a non-object line and a cut-off write
    (tmp_path / "metrics.jsonl").write_text(text)
    return tmp_path


def test_read_metrics_skips_bad_lines_and_non_finite_values(tmp_path):
    series, skipped = read_metrics(_write_run(tmp_path) / "metrics.jsonl")
    assert skipped == 2
    assert len(series["reward/mean"]) == 60 and series["reward/mean"][-1] == (60.0, 1.0)
    assert len(series["grad_norm"]) == 59 and all(math.isfinite(v) for _, v in series["grad_norm"])
    assert [s for s, _ in series["kl"]][:3] == [1.0, 3.0, 5.0]
    assert "note" not in series and "step" not in series


def test_families_by_substring():
    assert family_of("reward/mean") == "reward"
    assert family_of("rewards/accuracy/mean") == "reward"  # first family wins
    assert family_of("accuracy") == "accuracy"
    assert family_of("response/length_mean") == "length"
    assert family_of("clip/high_frac") == "clip"
    assert family_of("grad_norm_max") == "grad_norm"
    assert family_of("perf/sample_s") is None


def test_report_writes_plots_and_summary(tmp_path):
    run = _write_run(tmp_path)
    assert cli.main(["report", str(run)]) == 0
    out = run / "report"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["accuracy.png", "grad_norm.png", "kl.png", "length.png", "loss.png", "reward.png"]
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    md = (out / "summary.md").read_text()
    assert "2 unreadable line(s) skipped" in md
    row = next(line for line in md.splitlines() if line.startswith("| `loss`"))
    assert row.split("|")[2:7] == [" 1 ", " 0.01667 ", " 0.01667 ", " 1 ", " 0.01667 (60) "]
    row = next(line for line in md.splitlines() if line.startswith("| `accuracy`"))
    assert row.split("|")[6].strip() == "1 (30)"  # best = first step reaching the max
    assert "| `perf/sample_s` | 1.5 | 1.5 | 1.5 | 1.5 | - |" in md
    assert "![reward](reward.png)" in md


def test_report_of_an_all_nan_metric_and_bad_dirs(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": NaN, "kl": 0.1}\n{"step": 2, "loss": NaN}\n')
    md = write_report(tmp_path).read_text()
    assert "| `loss` | - | - | - | - | - |" in md
    assert not (tmp_path / "report" / "loss.png").exists() and (tmp_path / "report" / "kl.png").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["report", str(empty)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    (empty / "metrics.jsonl").write_text("garbage\n")
    with pytest.raises(Exception, match="no numeric metrics"):
        write_report(empty)
