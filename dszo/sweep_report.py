"""A sweep's summary: summary.json (every row, with dev curves), summary.csv (the scalar columns) and two plots --
the ranking metric against each swept key (mean over seeds, min-max band) and dev accuracy against
example-forward passes (one curve per setting, mean over seeds)."""
from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path

SCALARS = (int, float, str, bool, type(None))


def write_summary(spec, rows: list[dict]) -> None:
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Written to a temporary name and renamed: array tasks that finish together each write a whole file.
    tmp = out / f".summary.{os.getpid()}"
    tmp.write_text(json.dumps({"spec": spec.__dict__, "rows": rows}, indent=2) + "\n")
    os.replace(tmp, out / "summary.json")
    # scalar columns, and swept values that are lists (e.g. method.target_modules) as their JSON text
    columns = list(dict.fromkeys(k for r in rows for k, v in r.items()
                                 if isinstance(v, SCALARS) or k in spec.grid or any(k in p for p in spec.points)))
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: label(v) for k, v in r.items()} for r in rows)
    os.replace(tmp, out / "summary.csv")
    done = [r for r in rows if r["state"] == "done"]
    if done:
        _plot(spec, done, tmp.with_suffix(".png"))
        os.replace(tmp.with_suffix(".png"), out / "summary.png")


def label(value):
    """A swept value as a table cell or a dictionary key: lists and mappings as their JSON text."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def settings(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by their overrides without the seed (a setting's seeds together)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["name"].rsplit(",seed=", 1)[0]].append(r)
    return dict(groups)


def seed_stats(values: list[float]) -> tuple[float, float, float]:
    return statistics.fmean(values), min(values), max(values)


def _plot(spec, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(spec.grid)
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(5 * (len(keys) + 1), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        _plot_metric_vs_key(ax, spec, rows, key)
    ax = axes[0][-1]
    for name, group in settings(rows).items():
        curves = [r["dev_curve"] for r in group if r.get("dev_curve")]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        xs = [curves[0][i][0] for i in range(n)]
        ys = [statistics.fmean(c[i][1] for c in curves) for i in range(n)]
        ax.plot(xs, ys, marker=".", label=name)
    ax.set_xlabel("example-forward passes")
    ax.set_ylabel("dev accuracy (mean over seeds)")
    if len(settings(rows)) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_metric_vs_key(ax, spec, rows: list[dict], key: str) -> None:
    others = [k for k in spec.grid if k != key]
    lines: dict[tuple, dict] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get(spec.metric) is not None and key in r:
            lines[tuple(label(r.get(k)) for k in others)][label(r[key])].append(r[spec.metric])
    for line, by_value in lines.items():
        xs = sorted(by_value, key=lambda v: (isinstance(v, str), v))
        stats = [seed_stats(by_value[x]) for x in xs]
        where = list(range(len(xs))) if isinstance(xs[0], str) else xs
        ax.plot(where, [s[0] for s in stats], marker="o",
                label=", ".join(f"{k}={v}" for k, v in zip(others, line)) or None)
        ax.fill_between(where, [s[1] for s in stats], [s[2] for s in stats], alpha=0.2)
        if isinstance(xs[0], str):
            ax.set_xticks(where, xs, fontsize=7)
    values = [v for r in rows for v in [r.get(key)] if isinstance(v, (int, float))]
    if values and min(values) > 0 and max(values) / min(values) >= 10 and not math.isclose(min(values), max(values)):
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel(spec.metric)
    if others and len(lines) <= 8:
        ax.legend(fontsize=6)
