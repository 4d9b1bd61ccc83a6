"""Run reports: ``results.json``, ``results.md`` (tables) and plots."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_write_json, atomic_write_text
from .config import RETRIEVAL_METRICS, Config, to_dict
from .deploy import deployment_ratios, deployment_table
from .pairing import pairs_markdown


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Save a matplotlib figure atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip('.') or 'png')
    os.replace(tmp, path)


def machine_info() -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def retrieval(res: dict[str, Any], protocol: str, metric: str) -> dict[str, Any] | None:
    """One model's retrieval metrics for (protocol, metric) from ``evaluate_model``'s flat keys, or None."""
    prefix = f"retrieval/{metric}/{protocol}/"
    block: dict[str, Any] = {k[len(prefix):]: v for k, v in res.items() if k.startswith(prefix)}
    if not block:
        return None
    pr = res.get("pr_curves", {}).get(f"{metric}/{protocol}")
    if pr:
        block["pr_curve"] = pr
    return block


def protocols_in(models: dict[str, Any]) -> list[str]:
    found = {k.split("/")[2] for r in models.values() for k in r if k.startswith("retrieval/")}
    return sorted(found, key=lambda p: (p != "standard", p))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}" if x <= 1.0 else f"{x:.2f}"


def results_table(models: dict[str, Any], protocol: str = "standard") -> str:
    """Markdown table: one row per model, top-1 and retrieval metrics in percent."""
    head = "| model | role | arch | params | top-1 | mAP cos | mAP euc | mAP11 cos | mAP11 euc | P@100 cos | P@100 euc |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in models.items():
        cos, euc = retrieval(r, protocol, "cosine") or {}, retrieval(r, protocol, "euclidean") or {}
        lines.append(
            f"| {name} | {r.get('role', '')} | {r.get('model', '')} | {r.get('params', 0) / 1e6:.3f}M | "
            f"{r.get('top1', float('nan')):.2f} | {_pct(cos.get('map'))} | {_pct(euc.get('map'))} | "
            f"{_pct(cos.get('map11'))} | {_pct(euc.get('map11'))} | {_pct(cos.get('p@100'))} | {_pct(euc.get('p@100'))} |"
        )
    return "\n".join(lines)


def _padded(values: list[float], frac: float = 0.05, least: float = 0.005) -> tuple[float, float]:
    """Axis limits around ``values`` with a margin of ``frac`` of their range (at least ``least``)."""
    lo, hi = min(values), max(values)
    pad = max(least, frac * (hi - lo))
    return lo - pad, hi + pad


def plot_pr_curves(models: dict[str, Any], path: Path, protocol: str = "standard") -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(RETRIEVAL_METRICS), figsize=(5 * len(RETRIEVAL_METRICS), 4), squeeze=False)
    drawn = False
    for ax, metric in zip(axes[0], RETRIEVAL_METRICS):
        recall: list[float] = []
        precision: list[float] = []
        for name, r in models.items():
            block = retrieval(r, protocol, metric)
            if not block or "pr_curve" not in block:
                continue
            ax.plot(block["pr_curve"]["recall"], block["pr_curve"]["precision"], marker=".", label=name)
            recall += [float(x) for x in block["pr_curve"]["recall"]]
            precision += [float(x) for x in block["pr_curve"]["precision"]]
            drawn = True
        ax.set(title=f"precision-recall ({metric})", xlabel="recall", ylabel="precision")
        if precision:
            # Zoomed to the curves: on a fixed 0-1 axis good models' curves sit flat against the top edge.
            ax.set_xlim(*_padded(recall))
            ax.set_ylim(*_padded(precision))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    if drawn:
        save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path if drawn else None


def plot_training(metrics_path: Path, out_dir: Path) -> list[Path]:
    """One figure per stage: loss terms and test top-1 against epochs, from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.is_file():
        return []
    stages: dict[str, list[dict[str, Any]]] = {}
    for line in metrics_path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            stages.setdefault(row["stage"], []).append(row)
    paths = []
    for stage, rows in stages.items():
        fig, ax = plt.subplots(figsize=(7.5, 3.6), layout="constrained")
        epochs = [r["epoch"] for r in rows]
        phases = _shade_phases(ax, rows)
        keys = sorted({k for r in rows for k in r if k.startswith("loss/")})
        for k in keys:
            # markers: a 1-epoch phase is one point and would vanish as a line
            ax.plot(epochs, [r.get(k, float("nan")) for r in rows], marker="o", ms=3, label=k[5:])
        ax.set(xlabel="epoch", ylabel="loss", title=stage, yscale="log")
        handles, labels = ax.get_legend_handles_labels()
        if any("test_top1" in r for r in rows):
            ax2 = ax.twinx()
            (top1,) = ax2.plot([r["epoch"] for r in rows if "test_top1" in r],
                               [r["test_top1"] for r in rows if "test_top1" in r], "k--", marker=".")
            ax2.set_ylabel("test top-1 (%)")
            handles.append(top1)
            labels.append("test top-1 (right axis)")
        # One legend outside the axes, phases included: labels drawn over the plot collided with the
        # title and the legend (and a twin axis's line never reached an axes legend).
        handles += [h for h, _ in phases]
        labels += [f"phase: {name}" for _, name in phases]
        fig.legend(handles, labels, loc="outside right upper", fontsize=7)
        p = out_dir / f"train_{stage.replace('.', '_')}.png"
        save_figure(fig, p)
        plt.close(fig)
        paths.append(p)
    return paths


def _shade_phases(ax: Any, rows: list[dict[str, Any]]) -> list[tuple[Any, str]]:
    """Shade contiguous runs of the same curriculum phase (epoch e spans [e - 0.5, e + 0.5]); returns
    a legend handle and name per phase (none for a stage with one phase)."""
    spans: list[tuple[str, int, int]] = []
    for r in rows:
        ph = str(r.get("phase", ""))
        if spans and spans[-1][0] == ph and spans[-1][2] == r["epoch"] - 1:
            spans[-1] = (ph, spans[-1][1], r["epoch"])
        else:
            spans.append((ph, r["epoch"], r["epoch"]))
    if len({p for p, _, _ in spans}) < 2:
        return []
    colours = ["#dde8f7", "#f7e6d5", "#e0f2dc", "#f1dcef", "#f4f1d2", "#e4e4e4"]
    names = list(dict.fromkeys(p for p, _, _ in spans))
    handles: dict[str, Any] = {}
    for ph, a, b in spans:
        span = ax.axvspan(a - 0.5, b + 0.5, color=colours[names.index(ph) % len(colours)], alpha=0.8, lw=0)
        handles.setdefault(ph, span)
    return [(handles[ph], ph.split(":", 1)[-1]) for ph in names]


def _previous_report(run_dir: Path) -> dict[str, Any] | None:
    """The ``results.json`` an earlier invocation wrote into ``run_dir``, or None (none, or unreadable)."""
    try:
        old = json.loads((run_dir / "results.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return old if isinstance(old, dict) else None


def _same_json(a: Any, b: Any) -> bool:
    """Equal once written as JSON (tuples are lists; NaN equals NaN, as the file reads it back)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def write_report(
    run_dir: str | Path, models: dict[str, Any], *, cfg: Config | None = None, command: str = "",
    wall_time_s: float | None = None, data_source: str | None = None, trained: bool = True,
) -> dict[str, Any]:
    """Write results.json, results.md and plots/ into ``run_dir``; return the results dict.

    ``trained=False`` (this invocation trained nothing, every stage had finished): a report with the same
    results is left as the invocation that trained wrote it (its wall time, command, machine) and returned;
    results that changed (other evaluation settings) are written with the earlier wall time of training.
    """
    run_dir = Path(run_dir)
    wall_note = "this invocation; finished stages are not re-run"
    previous = _previous_report(run_dir) if not trained else None
    if previous is not None:
        if _same_json(previous.get("models"), models):
            return previous
        if previous.get("wall_time_s") is not None:
            wall_time_s = previous["wall_time_s"]
            wall_note = "of the invocation that trained; this one trained nothing and re-evaluated"
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    out = {
        "command": command,
        "machine": machine_info(),
        "wall_time_s": wall_time_s,
        "config": to_dict(cfg) if cfg is not None else None,
        "data_source": data_source,
        "models": models,
        "deployment": deployment_ratios(models),  # student/teacher ratios and flags (per model: models[...].deployment)
    }
    atomic_write_json(run_dir / "results.json", out)
    pr = plot_pr_curves(models, plots / "pr_curves.png")
    train_plots = plot_training(run_dir / "metrics.jsonl", plots)
    protocols = protocols_in(models)
    md = [f"# Results: {run_dir.name}", ""]
    if command:
        md += [f"Command: `{command}`", ""]
    m = out["machine"]
    md += [f"Machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']} ({m['torch_threads']} threads)"
           + (f", GPU {m['cuda']}" if m["cuda"] else "")]
    if wall_time_s is not None:
        md += [f"Wall time: {wall_time_s / 60:.1f} min ({wall_note})"]
    md += [""]
    for protocol in protocols or ["standard"]:
        label = "standard metrics" if protocol == "standard" else "the authors' evaluation protocol (see docs/evaluation.md)"
        md += [f"## Retrieval: {label}", "", results_table(models, protocol), ""]
    md += ["Top-1 is on the test split at the end of training (never the best epoch). Retrieval: database = training "
           "split without augmentation, queries = test split, features = the embedding tap. All numbers in percent.", ""]
    deploy = deployment_table(models, out["deployment"])
    if deploy:
        md += ["## Deployment", "", deploy, ""]
    for name, r in models.items():  # the stage pairs each arm distilled (warmup and KD method alike)
        if r.get("pairing"):
            md += [f"## Stage pairs: {name}", "", pairs_markdown(r["pairing"]), ""]
    if pr:
        md += [f"![precision-recall]({pr.relative_to(run_dir)})", ""]
    if train_plots:  # an evaluation (eval/<checkpoint>/) trains nothing: no curves, no empty line
        md += [f"Training curves: {', '.join(str(p.relative_to(run_dir)) for p in train_plots)}", ""]
    atomic_write_text(run_dir / "results.md", "\n".join(md))
    return out
