"""``indistill grid``: one config over several seeds, arms paired within a seed, with paired statistics.

Layout of ``out_dir/name`` (every piece resumable on its own)::

    shared/                  the teacher (and auxiliary), trained once with ``cfg.seed`` (or per seed)
    cells/s<seed>/<arm>/     one ordinary run directory per (seed, arm): one student arm, evaluated
    cells/s<seed>/<arm>.yaml the cell's config (written by the grid, read by its worker)
    grid.json, grid.md       per arm and metric: mean, std, min, max over seeds; for every "InDistill + M"
    plots/grid_<metric>.png  arm the paired difference to its "M" arm (mean, 95% t CI, seeds won)
    grid_command.json        how the grid was run (config, seeds, order, overrides): what --report-only reuses

Within a seed every arm starts from the same initial student and sees the same data order
(both are functions of the cell's seed), so the difference between "M" and "InDistill + M" of one
seed is a paired observation. Cells run in ``--workers`` processes of ``--threads`` threads each;
a cell's numbers do not depend on how many workers ran beside it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import atomic_write_json, atomic_write_text
from .config import ArmSpec, Config, config_from_tree, dump_config, load_config, resolve_arms, to_dict
from .errors import UserError, suggest
from .rundir import RunDir

#: the metrics a grid summarises (key in a model's results -> label)
HEADLINE = {
    "top1": "top-1",
    "retrieval/cosine/standard/map": "mAP cos",
    "retrieval/euclidean/standard/map": "mAP euc",
    "retrieval/cosine/reference/map11": "mAP11 cos (ref.)",
    "retrieval/euclidean/reference/map11": "mAP11 euc (ref.)",
    "retrieval/cosine/standard/p@100": "P@100 cos",
    "retrieval/cosine/reference/p@100": "P@100 cos (ref.)",
}


#: the power behind the "detectable difference" of a paired comparison
POWER = 0.8


def cell_dir(root: Path, seed: int, arm: str) -> Path:
    return root / "cells" / f"s{seed}" / arm


def pairs_of(arms: list[ArmSpec]) -> dict[str, str]:
    """``{"indistill_M": "M"}``: every warmup arm and its first baseline (see :func:`comparisons`)."""
    out: dict[str, str] = {}
    for _key, warm, base in comparisons(arms):
        out.setdefault(warm, base)
    return out


def comparisons(arms: list[ArmSpec]) -> list[tuple[str, str, str]]:
    """``(key, warmup arm, baseline arm)`` for every paired comparison a grid reports.

    A warmup arm is compared with the arms its ``baseline`` names or, without one, the first arm with
    the same method and params but no warmup. The key is the warmup arm's name, or
    ``"<warm> vs <base>"`` for each baseline of an arm that names several.
    """
    out = []
    for a in arms:
        if a.warmup != "indistill":
            continue
        bases = list(a.baseline or [])
        if not bases:
            bases = [b.name for b in arms if b.warmup == "none" and b.method == a.method
                     and (b.params or {}) == (a.params or {})][:1]
        for base in bases:
            out.append((a.name if len(bases) == 1 else f"{a.name} vs {base}", a.name, base))
    return out


# -- statistics ---------------------------------------------------------------------------------
def describe(values: list[float]) -> dict[str, float]:
    """Mean, sample std, min, max."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values)}


def paired(diffs: list[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean paired difference with its two-sided t confidence interval, and the seeds it won."""
    from scipy import stats

    d = describe(diffs)
    n = d["n"]
    if n > 1:
        t_ci = float(stats.t.ppf(0.5 + confidence / 2, n - 1))
        half = t_ci * d["std"] / math.sqrt(n)
        # The smallest true difference this many seeds detect 80% of the time (two-sided, at the CI's level),
        # if the paired sd is what this grid measured: what a grid that "found nothing" could have found.
        mde = (t_ci + float(stats.t.ppf(POWER, n - 1))) * d["std"] / math.sqrt(n)
    else:
        half = mde = float("nan")
    return {**d, "ci_low": d["mean"] - half, "ci_high": d["mean"] + half, "ci_half": half, "mde80": mde,
            "wins": sum(x > 0 for x in diffs), "losses": sum(x < 0 for x in diffs), "confidence": confidence}


def summarise(results: dict[int, dict[str, dict[str, Any]]], arms: list[ArmSpec]) -> dict[str, Any]:
    """``results[seed][arm]`` = the arm's evaluation dict -> per-arm stats and paired differences."""
    seeds = sorted(results)
    metrics = [m for m in HEADLINE if any(m in results[s].get(a.name, {}) for s in seeds for a in arms)]
    per_arm: dict[str, Any] = {}
    for a in arms:
        per_arm[a.name] = {}
        for m in metrics:
            vals = [float(results[s][a.name][m]) for s in seeds if a.name in results[s] and m in results[s][a.name]]
            if vals:
                per_arm[a.name][m] = {**describe(vals), "values": vals}
    diffs: dict[str, Any] = {}
    for key, warm, base in comparisons(arms):
        both = [s for s in seeds if warm in results[s] and base in results[s]]
        if not both:
            continue
        diffs[key] = {"arm": warm, "baseline": base, "seeds": both, "metrics": {}}
        for m in metrics:
            d = [float(results[s][warm][m]) - float(results[s][base][m]) for s in both
                 if m in results[s][warm] and m in results[s][base]]
            if d:
                diffs[key]["metrics"][m] = {**paired(d), "values": d}
    return {"seeds": seeds, "metrics": metrics, "arms": per_arm, "paired": diffs}


def _scale(metric: str) -> float:
    return 1.0 if metric == "top1" else 100.0  # top-1 is already in percent, retrieval metrics are fractions


def win_label(stats_: dict[str, Any]) -> str:
    """Seeds won of seeds paired, the one notation for wins in reports and the README: ``"2/3 won"``."""
    return f"{stats_['wins']}/{stats_['n']} won"


def grid_markdown(summary: dict[str, Any], *, title: str, command: str, wall_s: float | None, machine: str,
                  finished: tuple[int, int] | None = None) -> str:
    seeds = summary["seeds"]
    md = [f"# Grid: {title}", "", f"Command: `{command}`", "", f"Seeds: {', '.join(map(str, seeds))} "
          f"({len(seeds)}); arms paired within a seed (same initial student, same data order).", "",
          f"Machine: {machine}" + (f"; wall time of the last invocation {wall_s / 60:.1f} min" if wall_s else ""), ""]
    if finished and finished[0] < finished[1]:
        md += [f"**Unfinished: {finished[0]} of {finished[1]} cells.** The tables cover the finished cells only "
               f"(a paired difference uses the seeds where both arms finished); the command above continues the grid.", ""]
    metrics = summary["metrics"]
    md += ["## Per arm: mean ± std over seeds [min, max], in percent", "",
           "| arm | " + " | ".join(HEADLINE[m] for m in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for arm, stats_ in summary["arms"].items():
        cells = []
        for m in metrics:
            s = stats_.get(m)
            k = _scale(m)
            cells.append("-" if s is None else f"{s['mean'] * k:.2f} ± {s['std'] * k:.2f} [{s['min'] * k:.2f}, {s['max'] * k:.2f}]")
        md.append(f"| {arm} | " + " | ".join(cells) + " |")
    if summary["paired"]:
        md += ["", "## InDistill + M minus M, paired by seed (percentage points)", "",
               "Mean difference, 95% t confidence interval, and seeds won of the seeds paired "
               "(\"2/3 won\": the InDistill arm scored higher than its base on 2 of 3 seeds).", "",
               "| arms | " + " | ".join(HEADLINE[m] for m in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
        for warm, p in summary["paired"].items():
            cells = []
            for m in metrics:
                s = p["metrics"].get(m)
                k = _scale(m)
                ci = (f"[{s['ci_low'] * k:+.2f}, {s['ci_high'] * k:+.2f}]" if s is not None and math.isfinite(s["ci_low"])
                      else "[no CI: 1 seed]")
                cells.append("-" if s is None else f"{s['mean'] * k:+.2f} {ci} {win_label(s)}")
            md.append(f"| {p.get('arm', warm)} - {p['baseline']} | " + " | ".join(cells) + " |")
        md += ["", f"Detectable difference: the smallest true paired difference these seeds would detect with "
               f"{POWER:.0%} power (two-sided 5%), given the paired sd measured here (percentage points).", "",
               "| arms | seeds | " + " | ".join(HEADLINE[m] for m in metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
        for warm, p in summary["paired"].items():
            cells = []
            for m in metrics:
                s = p["metrics"].get(m)
                cells.append("-" if s is None or not math.isfinite(s.get("mde80", float("nan"))) else f"{s['mde80'] * _scale(m):.2f}")
            md.append(f"| {p.get('arm', warm)} - {p['baseline']} | {len(p['seeds'])} | " + " | ".join(cells) + " |")
    md += ["", "A confidence interval that contains 0 means this grid cannot tell the two arms apart on that metric.",
           "Retrieval: database = training split without augmentation, queries = test split, features = the embedding "
           "tap; (ref.) = the authors' evaluation protocol (docs/evaluation.md). Top-1 at the end of training.", ""]
    return "\n".join(md)


def _jitter(x: float, n: int) -> list[float]:
    """``n`` x positions spread around ``x``, so the seeds of one arm do not hide each other."""
    return [x + (j - (n - 1) / 2) * 0.05 for j in range(n)]


def plot_grid(summary: dict[str, Any], results: dict[int, dict[str, dict[str, Any]]], out_dir: Path) -> list[Path]:
    """One figure per metric. Left: every seed's value per arm, mean and 95% CI, each warmup arm beside its
    base. Right: each paired comparison, warmup arm minus base per seed, the mean and 95% CI of that paired
    difference, and a zero line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats

    from .report import save_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    arms = list(summary["arms"])
    pairs = summary["paired"]
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
    paths = []
    for m in summary["metrics"]:
        k = _scale(m)
        diffs = [(f"{p.get('arm', key)} - {p['baseline']}", p["metrics"][m]) for key, p in pairs.items()
                 if m in p["metrics"]]
        widths = [max(4.0, 0.8 * len(order) + 1.2)] + ([max(4.0, 0.8 * len(diffs) + 1.6)] if diffs else [])
        fig, axes = plt.subplots(1, len(widths), figsize=(sum(widths), 4.0), width_ratios=widths,
                                 layout="constrained", squeeze=False)
        ax = axes[0][0]
        for i, a in enumerate(order):
            s = summary["arms"][a].get(m)
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
        if diffs:
            # The arms of one seed share the initial student and the data order, so the per-arm intervals
            # overlap even where every seed moved the same way: the conclusions rest on this panel.
            bx = axes[0][1]
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
        fig.suptitle(HEADLINE[m], fontsize=10)
        p = out_dir / f"grid_{m.replace('/', '_').replace('@', 'at')}.png"
        save_figure(fig, p)
        plt.close(fig)
        paths.append(p)
    return paths


# -- running ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Cell:
    seed: int
    arm: ArmSpec
    dir: Path
    config: Path

    @property
    def label(self) -> str:
        return f"s{self.seed}/{self.arm.name}"

    @property
    def done(self) -> bool:
        return (self.dir / "results.json").is_file()


class Grid:
    """The cells of one config over ``seeds``, sharing a teacher/auxiliary trained in ``shared/``."""

    def __init__(self, cfg: Config, seeds: list[int], *, per_seed_sources: bool = False):
        if not seeds:
            raise UserError("a grid needs at least one seed; use --seeds N with N >= 1")
        self.cfg = cfg
        self.seeds = seeds
        self.per_seed_sources = per_seed_sources
        self.root = cfg.run_dir
        self.arms = resolve_arms(cfg)
        names = [a.name for a in self.arms]
        for a in self.arms:
            for b in a.baseline or []:
                if b not in names or b == a.name:
                    raise UserError(f"arm '{a.name}': baseline '{b}' is not another arm of the grid"
                                    f"{suggest(b, names)}; arms: {', '.join(names)}")

    def shared_cfg(self, seed: int | None) -> Config:
        cfg = dataclasses.replace(self.cfg, name="shared" if seed is None else f"s{seed}",
                                  out_dir=str(self.root if seed is None else self.root / "shared"),
                                  seed=self.cfg.seed if seed is None else seed, arms=[])
        return cfg

    def sources(self, seed: int) -> tuple[str | None, str | None]:
        """Checkpoint paths of the trained teacher and auxiliary a cell of ``seed`` reads."""
        run = self.shared_cfg(seed if self.per_seed_sources else None).run_dir
        teacher = self.cfg.teacher.checkpoint or str(run / "checkpoints" / "teacher.pt")
        aux = None
        if self.cfg.auxiliary.enabled:
            aux = self.cfg.auxiliary.checkpoint or str(run / "checkpoints" / "auxiliary_pkt.pt")
        return teacher, aux

    def train_sources(self, log=print) -> None:
        """Train (or resume, or find finished) the shared teacher and auxiliary, and evaluate them once."""
        from .pipeline import Pipeline

        for seed in (self.seeds if self.per_seed_sources else [None]):
            cfg = self.shared_cfg(seed)
            done = [(Path(p).is_file()) for p in self.sources(seed if seed is not None else self.seeds[0]) if p]
            if all(done) and (cfg.run_dir / "results.json").is_file():
                continue
            log(f"grid: training the shared teacher{' and auxiliary' if cfg.auxiliary.enabled else ''} in {cfg.run_dir}")
            Pipeline(cfg).run_sources(command="indistill grid (shared sources)")

    def cells(self) -> list[Cell]:
        out = []
        for seed in self.seeds:
            for arm in self.arms:
                d = cell_dir(self.root, seed, arm.name)
                out.append(Cell(seed, arm, d, d.parent / f"{arm.name}.yaml"))
        return out

    def write_cell_config(self, cell: Cell) -> None:
        """Write the cell's config, unless the cell has finished (its file then records what it ran)."""
        if cell.done and cell.config.is_file():
            return
        teacher, aux = self.sources(cell.seed)
        cfg = dataclasses.replace(
            self.cfg, name=cell.arm.name, out_dir=str(cell.dir.parent), seed=cell.seed, progress=False,
            arms=[cell.arm], evaluate=dataclasses.replace(self.cfg.evaluate, sources=False),
            teacher=dataclasses.replace(self.cfg.teacher, checkpoint=teacher),
            auxiliary=dataclasses.replace(self.cfg.auxiliary, checkpoint=aux),
        )
        text = dump_config(cfg)
        if not cell.config.is_file() or cell.config.read_text() != text:
            atomic_write_text(cell.config, text)

    def collect(self) -> dict[int, dict[str, dict[str, Any]]]:
        results: dict[int, dict[str, dict[str, Any]]] = {}
        for c in self.cells():
            if c.done:
                res = json.loads((c.dir / "results.json").read_text())
                results.setdefault(c.seed, {})[c.arm.name] = res["models"][c.arm.name]
        return results


ORDERS = ("seeds", "pairs", "arms")


def schedule(cells: list[Cell], arms: list[ArmSpec], order: str = "seeds") -> list[Cell]:
    """The order cells are run in. ``seeds``: seed by seed, every arm of a seed together. ``pairs``: method
    by method, each arm with its InDistill counterpart over every seed, so a grid stopped early has whole
    paired comparisons (all seeds of the first methods) instead of every method on the first seeds.
    ``arms``: arm by arm in the config's order, every seed of an arm together (an ablation whose arms
    are listed by priority, beside baseline cells that have finished)."""
    if order == "seeds":
        return sorted(cells, key=lambda c: c.seed)
    if order == "arms":
        rank_of = {a.name: i for i, a in enumerate(arms)}
        return sorted(cells, key=lambda c: (rank_of[c.arm.name], c.seed))
    if order != "pairs":
        raise UserError(f"grid order {order!r} is not one of {', '.join(ORDERS)}")
    warm_of = pairs_of(arms)
    group: dict[str, int] = {}
    for a in arms:  # a base arm and its warmup arms share the first position either of them has
        base = warm_of.get(a.name, a.name)
        group.setdefault(base, len(group))
        group[a.name] = group[base]
    rank = {a.name: i for i, a in enumerate(arms)}
    return sorted(cells, key=lambda c: (group[c.arm.name], c.seed, rank[c.arm.name]))


def grid_eta(todo: list[str], running: list[tuple[str, float]], by_arm: dict[str, list[float]], workers: int) -> float:
    """Seconds left: each arm's cells cost that arm's mean finished duration (arms differ: a CRD cell
    costs ~8 KD cells), the overall mean for an arm with none finished yet; running cells count what
    their estimate has left; the work is shared by ``workers``."""
    done = [d for ds in by_arm.values() for d in ds]
    if not done:
        return 0.0
    overall = sum(done) / len(done)

    def est(arm: str) -> float:
        ds = by_arm.get(arm)
        return sum(ds) / len(ds) if ds else overall

    work = sum(est(a) for a in todo) + sum(max(0.0, est(a) - elapsed) for a, elapsed in running)
    return work / max(1, workers)


def run_cells(cells: list[Cell], *, workers: int, threads: int, log=print) -> float:
    """Run unfinished cells in ``workers`` subprocesses (``threads`` each); print progress and an ETA."""
    todo = [c for c in cells if not c.done]
    total, finished = len(cells), len(cells) - len(todo)
    if not todo:
        return 0.0
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), INDISTILL_THREADS=str(threads))
    running: list[tuple[Cell, subprocess.Popen, float, Any]] = []
    by_arm: dict[str, list[float]] = {}  # finished cells' durations, per arm
    t0 = time.perf_counter()
    failed: list[str] = []
    while todo or running:
        while todo and len(running) < workers:
            c = todo.pop(0)
            c.dir.parent.mkdir(parents=True, exist_ok=True)
            logf = open(c.dir.parent / f"{c.arm.name}.log", "a")
            cmd = [sys.executable, "-m", "indistill", "run", str(c.config)]
            running.append((c, subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env), time.perf_counter(), logf))
            log(f"grid: [{finished}/{total}] started {c.label}")
        time.sleep(0.5)
        for item in list(running):
            c, proc, start, logf = item
            if proc.poll() is None:
                continue
            running.remove(item)
            logf.close()
            if proc.returncode != 0 or not c.done:
                failed.append(c.label)
                log(f"grid: {c.label} FAILED (exit {proc.returncode}); see {c.dir.parent / (c.arm.name + '.log')}")
                continue
            finished += 1
            took = time.perf_counter() - start
            by_arm.setdefault(c.arm.name, []).append(took)
            eta = grid_eta([x.arm.name for x in todo], [(x.arm.name, time.perf_counter() - st) for x, _, st, _ in running],
                           by_arm, workers)
            log(f"grid: [{finished}/{total}] {c.label} done in {took / 60:.1f} min; ETA {eta / 60:.0f} min")
    if failed:
        raise UserError(f"grid cells failed: {', '.join(failed)}; read their logs, fix, and re-run the same command")
    return time.perf_counter() - t0


def default_workers() -> int:
    """Measured here: two 1-thread processes train these small models 1.65x faster than one 2-thread one."""
    import torch

    if torch.cuda.is_available():
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


# -- what a grid directory remembers ----------------------------------------------------------
#: written when a grid starts: how it was run, so ``--report-only`` re-renders that same grid
COMMAND_FILE = "grid_command.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}); restore it (git) or delete it") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is damaged (not a JSON object); restore it (git) or delete it")
    return obj


def grid_record(root: Path) -> dict[str, Any] | None:
    """How the grid in ``root`` was run: its ``grid_command.json``, or for a grid run before that file existed,
    what its ``grid.json`` holds (the command line and the resolved config, ``resolved``); None for neither."""
    if (root / COMMAND_FILE).is_file():
        return _read_json(root / COMMAND_FILE)
    if not (root / "grid.json").is_file():
        return None
    old = _read_json(root / "grid.json")
    command = str(old.get("command", ""))
    seeds = re.search(r" --seeds (\d+)", command)
    order = re.search(r" --order (\w+)", command)
    return {"command": command, "seeds": int(seeds.group(1)) if seeds else len(old.get("cells") or {}) or None,
            "order": order.group(1) if order else "seeds", "overrides": None, "resolved": old.get("config")}


def reported_cells(root: Path) -> int | None:
    """How many finished cells the ``grid.json`` in ``root`` reports; None when there is none."""
    if not (root / "grid.json").is_file():
        return None
    old = _read_json(root / "grid.json")
    if old.get("cells_finished") is not None:
        return int(old["cells_finished"])
    return sum(len(r) for r in (old.get("cells") or {}).values())  # grids reported before cells_finished


def arms_on_disk(root: Path, seeds: list[int], known: list[str], log=print) -> list[ArmSpec]:
    """The arms of finished cells of ``seeds`` in ``root`` that ``known`` does not name, as each cell's own
    config ran it: a grid whose config renamed its arms, or one run with an ``arms=`` nobody recorded."""
    found: dict[str, ArmSpec] = {}
    for seed in seeds:
        d = root / "cells" / f"s{seed}"
        for path in sorted(d.glob("*.yaml")):
            name = path.stem
            if name in known or name in found or not (d / name / "results.json").is_file():
                continue
            try:
                arms = [a for a in resolve_arms(load_config(path)) if a.name == name]
            except UserError as e:
                log(f"grid: skipping the finished cells of arm '{name}': its config does not load ({e})")
                known = [*known, name]
                continue
            if arms:
                found[name] = arms[0]
    # No record of the config's order: baseline arms first, as a config lists them.
    return sorted(found.values(), key=lambda a: (a.warmup == "indistill", a.name))


def cmd_grid(args) -> int:
    from .report import machine_info

    cfg = load_config(args.config, args.overrides)
    root = cfg.run_dir
    record = grid_record(root) if args.report_only else None
    if record is not None:
        # Re-render the grid that ran: its overrides (arms=[...], precision=...) first, this command's on top.
        if record.get("overrides") is not None:
            cfg = load_config(args.config, [*record["overrides"], *args.overrides])
        elif record.get("resolved"):
            cfg = config_from_tree(record["resolved"], args.overrides, where=str(root / "grid.json"))
        cfg = dataclasses.replace(cfg, out_dir=str(root.parent), name=root.name)  # the directory found
    n_seeds = args.seeds if args.seeds is not None else int((record or {}).get("seeds") or 3)
    seeds = [cfg.seed + i for i in range(n_seeds)]
    if args.report_only and not any(o.split("=", 1)[0].strip() == "arms" for o in args.overrides):
        listed = resolve_arms(cfg)
        extra = arms_on_disk(root, seeds, [a.name for a in listed])
        if extra:
            # Arms with no finished cell at all are not this grid's (the config renamed them since): drop them.
            if not any((cell_dir(root, s, a.name) / "results.json").is_file() for s in seeds for a in listed):
                listed = []
            print(f"grid: reporting the finished cells of arms the config does not list: "
                  f"{', '.join(a.name for a in extra)}")
            cfg = dataclasses.replace(cfg, arms=[*listed, *extra])
    grid = Grid(cfg, seeds, per_seed_sources=args.per_seed_sources)
    workers = args.workers or default_workers()
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
    command = " ".join(["indistill", "grid", args.config, f"--seeds {n_seeds}",
                        *([f"--workers {args.workers}"] if args.workers else []),
                        *([f"--order {args.order}"] if args.order != "seeds" else []), *args.overrides])
    if record is not None and record.get("command"):
        command = str(record["command"])  # a re-rendered report names the command that ran the grid
    cells = grid.cells()
    reported = reported_cells(grid.root)
    t0 = time.perf_counter()
    if args.report_only:
        done = sum(c.done for c in cells)
        if not done:
            raise UserError(f"no finished cells under {grid.root / 'cells'}; run the grid without --report-only first")
        if reported is not None and done < reported:
            raise UserError(
                f"refusing to replace {grid.root / 'grid.md'}, which reports {reported} finished cells, with a report "
                f"of {done} ({len(seeds)} seeds x {len(grid.arms)} arms); give the seeds and arms the grid ran with "
                f"(`{command}`), or report into another directory (out_dir=...)")
        print(f"grid: reporting {done} of {len(cells)} cells finished (nothing is trained)")
    else:
        # One grid per directory: a second one would run (and fail) the same cells beside the first. A report
        # (--report-only) takes no lock: it is how one looks at a grid that is still running.
        held = RunDir(grid.root)
        held.lock()
        held.remove_temp_files(tuple(f"cells/s{s}" for s in seeds))  # the cell configs this grid writes
        try:
            if reported is not None and len(cells) < reported:
                raise UserError(
                    f"refusing to run a grid of {len(cells)} cells ({len(seeds)} seeds x {len(grid.arms)} arms) into "
                    f"{grid.root}, whose grid.md reports {reported} finished cells; give the seeds and arms it ran "
                    f"with, or use another directory (out_dir=... or name=...)")
            atomic_write_json(grid.root / COMMAND_FILE, {
                "command": command, "config": args.config, "seeds": n_seeds, "order": args.order,
                "workers": args.workers, "threads": args.threads, "per_seed_sources": args.per_seed_sources,
                "overrides": list(args.overrides)})
            grid.train_sources()
            for c in cells:
                grid.write_cell_config(c)
            print(f"grid: {len(cells)} cells ({len(seeds)} seeds x {len(grid.arms)} arms), {workers} workers x {threads} threads")
            run_cells(schedule(cells, grid.arms, args.order), workers=workers, threads=threads)
        finally:
            held.unlock()
    results = grid.collect()
    summary = summarise(results, grid.arms)
    old = _read_json(grid.root / "grid.json") if args.report_only and reported is not None else {}
    # A report re-rendered trains nothing: it keeps the machine, wall time, workers and config of the run that
    # trained (today's schema would add keys, with today's defaults, that the run never had).
    m = old.get("machine") or machine_info()
    machine = f"{m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']}"
    wall = old.get("wall_time_s") if args.report_only else time.perf_counter() - t0
    out = {"command": command, "cells_finished": sum(c.done for c in cells), "cells_total": len(cells), "machine": m,
           "wall_time_s": wall, "workers": old.get("workers", workers), "threads": old.get("threads", threads),
           "config": old.get("config") or to_dict(cfg), "summary": summary,
           "cells": {str(s): r for s, r in results.items()}}
    for r in out["cells"].values():
        for v in r.values():
            v.pop("pr_curves", None)
    atomic_write_json(grid.root / "grid.json", out)
    md = grid_markdown(summary, title=cfg.name, command=command, wall_s=wall, machine=machine,
                       finished=(out["cells_finished"], out["cells_total"]))
    plots = plot_grid(summary, results, grid.root / "plots")
    md += "\n" + "\n".join(f"![{p.stem}](plots/{p.name})" for p in plots) + "\n"
    atomic_write_text(grid.root / "grid.md", md)
    print(md)
    print(f"grid directory: {grid.root}  (grid.json, grid.md, plots/, cells/)")
    return 0


def add_grid_parser(add) -> None:
    p = add("grid", "one config over N seeds, arms paired within a seed: mean, std and paired 95% CIs", cmd_grid)
    p.add_argument("--seeds", type=int, default=None,
                   help="number of seeds (cfg.seed, cfg.seed+1, ...; default 3, with --report-only the recorded number)")
    p.add_argument("--workers", type=int, default=0, help="cells in parallel (default: one per CPU core, 1 on CUDA)")
    p.add_argument("--threads", type=int, default=0, help="threads per worker (default: cores / workers)")
    p.add_argument("--per-seed-sources", action="store_true", help="train the teacher and auxiliary once per seed")
    p.add_argument("--order", choices=ORDERS, default="seeds",
                   help="run cells seed by seed (default), method pair by method pair over all seeds (a grid "
                        "stopped early then has whole paired comparisons), or arm by arm in the config's order; "
                        "the numbers do not depend on it")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write grid.json/grid.md from the cells finished so far (a grid still running), "
                        "with the seeds and overrides the grid ran with (grid_command.json); never replaces a report "
                        "of more finished cells")
