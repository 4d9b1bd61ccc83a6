"""A grid's report: ``grid.json`` (the summary, every cell's numbers, how and where the grid ran),
``grid.md`` (per-arm table, paired differences, detectable differences) and ``plots/grid_<metric>.png``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_json, atomic_write_text
from ..config import to_dict
from .running import Cell, Grid
from .stats import HEADLINE, POWER, summarise


def _scale(metric: str) -> float:
    return 1.0 if metric == "top1" else 100.0  # top-1 is already in percent, retrieval metrics are fractions


def win_label(stats_: dict[str, Any]) -> str:
    """Seeds won of seeds paired, the one notation for wins in reports and the README: ``"2/3 won"``."""
    return f"{stats_['wins']}/{stats_['n']} won"


# -- grid.md --------------------------------------------------------------------------------------
def _table_head(first: str, metrics: list[str], extra_cols: int = 1) -> list[str]:
    """A markdown table's header (``first`` columns, then one per metric) and its rule."""
    return [f"| {first} | " + " | ".join(HEADLINE[m] for m in metrics) + " |", "|---" * (len(metrics) + extra_cols) + "|"]


def _header(seeds: list[int], *, title: str, command: str, wall_s: float | None, machine: str,
            finished: tuple[int, int] | None) -> list[str]:
    md = [f"# Grid: {title}", "", f"Command: `{command}`", "", f"Seeds: {', '.join(map(str, seeds))} "
          f"({len(seeds)}); arms paired within a seed (same initial student, same data order).", "",
          f"Machine: {machine}" + (f"; wall time of the last invocation {wall_s / 60:.1f} min" if wall_s else ""), ""]
    if finished and finished[0] < finished[1]:
        md += [f"**Unfinished: {finished[0]} of {finished[1]} cells.** The tables cover the finished cells only "
               f"(a paired difference uses the seeds where both arms finished); "
               + ("the command above continues the arms it names (--only), and without --only every arm." if " --only " in command
                  else "the command above continues the grid."), ""]
    return md


def _per_arm_table(summary: dict[str, Any]) -> list[str]:
    metrics = summary["metrics"]
    md = ["## Per arm: mean ± std over seeds [min, max], in percent", "", *_table_head("arm", metrics)]
    n_seeds = len(summary["seeds"])
    for arm, stats_ in summary["arms"].items():
        n = max((s["n"] for s in stats_.values()), default=0)
        label = arm if n == n_seeds else f"{arm} ({n} of {n_seeds} seeds)"
        cells = []
        for m in metrics:
            s = stats_.get(m)
            k = _scale(m)
            cells.append("-" if s is None else f"{s['mean'] * k:.2f} ± {s['std'] * k:.2f} [{s['min'] * k:.2f}, {s['max'] * k:.2f}]")
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    return md


def _paired_table(summary: dict[str, Any]) -> list[str]:
    metrics = summary["metrics"]
    md = ["", "## InDistill + M minus M, paired by seed (percentage points)", "",
          "Mean difference, 95% t confidence interval, and seeds won of the seeds paired "
          "(\"2/3 won\": the InDistill arm scored higher than its base on 2 of 3 seeds).", "",
          *_table_head("arms", metrics)]
    for warm, p in summary["paired"].items():
        cells = []
        for m in metrics:
            s = p["metrics"].get(m)
            k = _scale(m)
            ci = (f"[{s['ci_low'] * k:+.2f}, {s['ci_high'] * k:+.2f}]" if s is not None and math.isfinite(s["ci_low"])
                  else "[no CI: 1 seed]")
            cells.append("-" if s is None else f"{s['mean'] * k:+.2f} {ci} {win_label(s)}")
        md.append(f"| {p.get('arm', warm)} - {p['baseline']} | " + " | ".join(cells) + " |")
    return md


def _detectable_table(summary: dict[str, Any]) -> list[str]:
    metrics = summary["metrics"]
    md = ["", f"Detectable difference: the smallest true paired difference these seeds would detect with "
          f"{POWER:.0%} power (two-sided 5%), given the paired sd measured here (percentage points).", "",
          *_table_head("arms | seeds", metrics, extra_cols=2)]
    for warm, p in summary["paired"].items():
        cells = []
        for m in metrics:
            s = p["metrics"].get(m)
            cells.append("-" if s is None or not math.isfinite(s.get("mde80", float("nan"))) else f"{s['mde80'] * _scale(m):.2f}")
        md.append(f"| {p.get('arm', warm)} - {p['baseline']} | {len(p['seeds'])} | " + " | ".join(cells) + " |")
    return md


def grid_markdown(summary: dict[str, Any], *, title: str, command: str, wall_s: float | None, machine: str,
                  finished: tuple[int, int] | None = None) -> str:
    md = _header(summary["seeds"], title=title, command=command, wall_s=wall_s, machine=machine, finished=finished)
    md += _per_arm_table(summary)
    if summary["paired"]:
        md += _paired_table(summary) + _detectable_table(summary)
    md += ["", "A confidence interval that contains 0 means this grid cannot tell the two arms apart on that metric.",
           "Retrieval: database = training split without augmentation, queries = test split, features = the embedding "
           "tap; (ref.) = the authors' evaluation protocol (docs/evaluation.md). Top-1 at the end of training.", ""]
    return "\n".join(md)


# -- plots/grid_<metric>.png ----------------------------------------------------------------------
def _jitter(x: float, n: int) -> list[float]:
    """``n`` x positions spread around ``x``, so the seeds of one arm do not hide each other."""
    return [x + (j - (n - 1) / 2) * 0.05 for j in range(n)]


def _arm_order(arms: list[str], pairs: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The per-arm panel's order (each base arm followed by its warmup arms, then the rest) and
    ``{warmup arm: its base}``."""
    warm_base: dict[str, str] = {}
    for key, p in pairs.items():
        warm_base.setdefault(p.get("arm", key), p["baseline"])
    order: list[str] = []
    for a in arms:  # each base arm followed by its warmup arms
        if a in warm_base or a in order:
            continue
        order.append(a)
        order += [w for w, b in warm_base.items() if b == a and w not in order]
    order += [a for a in arms if a not in order]
    return order, warm_base


def _per_arm_panel(ax, per_arm: dict[str, Any], order: list[str], warm_base: dict[str, str], m: str) -> None:
    """Every seed's value per arm, and the arm's mean with its 95% t CI."""
    from scipy import stats

    k = _scale(m)
    for i, a in enumerate(order):
        s = per_arm[a].get(m)
        if s is None:
            continue
        vals = [v * k for v in s["values"]]
        colour = "tab:orange" if a in warm_base else "tab:blue"
        ax.scatter(_jitter(i, len(vals)), vals, s=14, color=colour, alpha=0.7)
        n = len(vals)
        half = float(stats.t.ppf(0.975, n - 1)) * s["std"] * k / math.sqrt(n) if n > 1 else 0.0
        ax.errorbar(i + 0.25, s["mean"] * k, yerr=half, fmt="D", color="k", ms=4, capsize=3)
    ax.set_xticks(range(len(order)), order, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(HEADLINE[m] + " (%)")
    ax.set_title("per arm: seeds (points), mean and 95% CI (black)\norange = InDistill warmup, beside its base",
                 fontsize=8)


def _paired_panel(bx, diffs: list[tuple[str, dict[str, Any]]], m: str) -> None:
    """Each comparison's paired differences per seed, their mean with its 95% t CI, and a zero line.

    The arms of one seed share the initial student and the data order, so the per-arm intervals
    overlap even where every seed moved the same way: the conclusions rest on this panel."""
    k = _scale(m)
    bx.axhline(0.0, color="0.35", lw=0.9, ls="--", zorder=1)
    for i, (_label, s) in enumerate(diffs):
        vals = [v * k for v in s["values"]]
        bx.scatter(_jitter(i, len(vals)), vals, s=14, color="tab:orange", alpha=0.7, zorder=2)
        half = s["ci_half"] * k if math.isfinite(s.get("ci_half", float("nan"))) else 0.0
        bx.errorbar(i + 0.25, s["mean"] * k, yerr=half, fmt="D", color="k", ms=4, capsize=3, zorder=3)
    bx.set_xticks(range(len(diffs)), [d[0] for d in diffs], rotation=30, ha="right", fontsize=8)
    bx.set_xlim(-0.6, len(diffs) - 0.4)
    bx.set_ylabel(f"{HEADLINE[m]} difference (points)")
    bx.set_title("InDistill arm minus its base, paired by seed:\nseeds (points), mean and 95% CI (black)",
                 fontsize=8)


def _metric_figure(plt, summary: dict[str, Any], order: list[str], warm_base: dict[str, str], m: str):
    """The figure of metric ``m``: the per-arm panel, and beside it the paired panel when there is a comparison."""
    pairs = summary["paired"]
    diffs = [(f"{p.get('arm', key)} - {p['baseline']}", p["metrics"][m]) for key, p in pairs.items()
             if m in p["metrics"]]
    widths = [max(4.0, 0.8 * len(order) + 1.2)] + ([max(4.0, 0.8 * len(diffs) + 1.6)] if diffs else [])
    fig, axes = plt.subplots(1, len(widths), figsize=(sum(widths), 4.0), width_ratios=widths,
                             layout="constrained", squeeze=False)
    _per_arm_panel(axes[0][0], summary["arms"], order, warm_base, m)
    if diffs:
        _paired_panel(axes[0][1], diffs, m)
    fig.suptitle(HEADLINE[m], fontsize=10)
    return fig


def plot_grid(summary: dict[str, Any], results: dict[int, dict[str, dict[str, Any]]], out_dir: Path) -> list[Path]:
    """One figure per metric. Left: every seed's value per arm, mean and 95% CI, each warmup arm beside its
    base. Right: each paired comparison, warmup arm minus base per seed, the mean and 95% CI of that paired
    difference, and a zero line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..report import save_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    order, warm_base = _arm_order(list(summary["arms"]), summary["paired"])
    paths = []
    for m in summary["metrics"]:
        fig = _metric_figure(plt, summary, order, warm_base, m)
        p = out_dir / f"grid_{m.replace('/', '_').replace('@', 'at')}.png"
        save_figure(fig, p)
        plt.close(fig)
        paths.append(p)
    return paths


# -- grid.json, and the whole report --------------------------------------------------------------
def write_report(grid: Grid, cells: list[Cell], *, command: str, old: dict[str, Any], wall_s: float | None,
                 workers: int, threads: int) -> str:
    """Write ``grid.json``, ``plots/`` and ``grid.md`` from the finished cells; return the markdown.

    ``old`` is the ``grid.json`` a re-rendered report replaces (else empty): a report re-rendered trains
    nothing, so it keeps the machine, workers and config of the run that trained (today's schema would
    add keys, with today's defaults, that the run never had).
    """
    from ..report import machine_info

    results = grid.collect()
    summary = summarise(results, grid.arms)
    m = old.get("machine") or machine_info()
    machine = f"{m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']}"
    out = {"command": command, "cells_finished": sum(c.done for c in cells), "cells_total": len(cells), "machine": m,
           "wall_time_s": wall_s, "workers": old.get("workers", workers), "threads": old.get("threads", threads),
           "config": old.get("config") or to_dict(grid.cfg), "summary": summary,
           "cells": {str(s): r for s, r in results.items()}}
    for r in out["cells"].values():
        for v in r.values():
            v.pop("pr_curves", None)
    atomic_write_json(grid.root / "grid.json", out)
    md = grid_markdown(summary, title=grid.cfg.name, command=command, wall_s=wall_s, machine=machine,
                       finished=(out["cells_finished"], out["cells_total"]))
    plots = plot_grid(summary, results, grid.root / "plots")
    md += "\n" + "\n".join(f"![{p.stem}](plots/{p.name})" for p in plots) + "\n"
    atomic_write_text(grid.root / "grid.md", md)
    return md
