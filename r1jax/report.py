"""Training report: plots and a summary table from a run's ``metrics.jsonl``.

``metrics.jsonl`` holds one JSON object per line with a ``step`` and any float metrics (the GRPO step writes
``reward/mean``, ``rewards/<fn>/mean``, ``accuracy``, ``response/length_mean``, ``kl``, ``entropy``, ``clip/frac``,
``loss``, ``grad_norm``, ...). ``write_report(run_dir)`` draws one PNG per metric family found (keys matched by
substring, each key in the first family that matches) into ``run_dir/report/`` and writes ``report/summary.md``: a
table of the first, last, min and max value of every numeric metric (and the best value with its step where a
direction is obvious), with the plots embedded.

Robust to what real runs leave behind: lines that are blank, truncated (a run killed mid-write) or not JSON objects
are skipped and counted; missing keys, non-numeric values, NaN and inf are dropped point by point; a metric with no
finite value is listed but not plotted.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from r1jax.errors import R1jaxError


def machine() -> dict:
    """What a measured figure was measured on: CPU count and model, the 1-minute load, and the library versions
    (float order, and so the demos' bitwise results, depends on all of them)."""
    import platform
    from importlib import metadata

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for pkg in ("r1jax", "jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpus": os.cpu_count(), "cpu_model": model, "load_avg_1m": round(os.getloadavg()[0], 2),
            "versions": versions}  # fmt: skip


# (family, substrings): a key joins the first family one of whose substrings it contains
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward", ("reward",)),
    ("accuracy", ("acc", "pass@", "maj@")),
    ("length", ("length",)),
    ("kl", ("kl",)),
    ("entropy", ("entropy",)),
    ("clip", ("clip",)),
    ("loss", ("loss",)),
    ("grad_norm", ("grad_norm",)),
)
HIGHER_IS_BETTER = ("reward", "acc", "pass@", "maj@")
LOWER_IS_BETTER = ("loss",)


class ReportError(R1jaxError):
    """A run directory without usable metrics."""


def read_metrics(path: str | os.PathLike) -> tuple[dict[str, list[tuple[float, float]]], int]:
    """``({metric: [(step, value), ...] sorted by step}, skipped lines)``; only finite numeric values are kept.

    A line without a numeric ``step`` uses its line index among the valid lines.
    """
    series: dict[str, list[tuple[float, float]]] = {}
    skipped = 0
    with open(path, "rb") as f:
        valid = 0
        for raw in f:
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                skipped += bool(raw.strip())
                continue
            if not isinstance(rec, dict):
                skipped += 1
                continue
            step = rec.get("step")
            step = float(step) if _is_number(step) and math.isfinite(step) else float(valid)
            valid += 1
            for name, value in rec.items():
                if name == "step" or not _is_number(value):
                    continue
                points = series.setdefault(name, [])  # a metric that is only ever NaN is still listed
                if math.isfinite(value):
                    points.append((step, float(value)))
    for points in series.values():
        points.sort(key=lambda p: p[0])
    return series, skipped


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def family_of(name: str) -> str | None:
    low = name.lower()
    for family, subs in FAMILIES:
        if any(s in low for s in subs):
            return family
    return None


def _direction(name: str) -> str | None:
    low = name.lower()
    if any(s in low for s in HIGHER_IS_BETTER):
        return "max"
    if any(s in low for s in LOWER_IS_BETTER):
        return "min"
    return None


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def plot_family(family: str, series: dict[str, list[tuple[float, float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, points in sorted(series.items()):
        steps, values = zip(*points, strict=True)
        (line,) = ax.plot(steps, values, label=name, linewidth=1, alpha=0.5 if len(points) > 50 else 1.0)
        if len(points) > 50:  # a moving average over 5% of the run on top of the raw curve
            w = max(2, len(points) // 20)
            avg = [sum(values[max(0, i - w + 1) : i + 1]) / len(values[max(0, i - w + 1) : i + 1]) for i in
                   range(len(values))]  # fmt: skip
            ax.plot(steps, avg, color=line.get_color(), linewidth=2)
    ax.set_xlabel("step")
    ax.set_title(family)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/report/*.png`` and ``run_dir/report/summary.md``; returns the summary's path."""
    run = Path(run_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{run}: no metrics.jsonl")
    series, skipped = read_metrics(metrics)
    if not any(series.values()):
        raise ReportError(f"{metrics}: no numeric metrics")
    out = run / "report"
    out.mkdir(exist_ok=True)
    families: dict[str, dict[str, list]] = {}
    for name, points in series.items():
        fam = family_of(name)
        if fam is not None and points:
            families.setdefault(fam, {})[name] = points
    plots = []
    for fam, _ in FAMILIES:
        if fam in families:
            png = out / f"{fam}.png"
            plot_family(fam, families[fam], png)
            plots.append(png.name)

    steps = sorted({s for pts in series.values() for s, _ in pts})
    lines = [
        f"# Run report: {run.name}",
        "",
        f"{len(steps)} steps ({_fmt(steps[0])} .. {_fmt(steps[-1])}), {len(series)} metrics"
        + (f", {skipped} unreadable line(s) skipped" if skipped else "")
        + ".",
        "",
        "| metric | first | last | min | max | best (step) |",
        "|---|---|---|---|---|---|",
    ]
    for name in sorted(series):
        pts = series[name]
        if not pts:
            lines.append(f"| `{name}` | - | - | - | - | - |")
            continue
        values = [v for _, v in pts]
        best = "-"
        direction = _direction(name)
        if direction is not None:
            pick = max if direction == "max" else min
            s, v = pick(pts, key=lambda p: p[1])
            best = f"{_fmt(v)} ({_fmt(s)})"
        row = [_fmt(values[0]), _fmt(values[-1]), _fmt(min(values)), _fmt(max(values)), best]
        lines.append(f"| `{name}` | " + " | ".join(row) + " |")
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p[:-4]}]({p})" for p in plots]
    summary = out / "summary.md"
    tmp = summary.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, summary)
    return summary
