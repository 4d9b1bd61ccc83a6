"""Where a finished grid's wall time went, read from its run directories (nothing is trained here).

    python -m benchmarks.grid_profile [GRID_DIR ...] [--target-min 90]
    python -m benchmarks --only grid_profile          (the committed Fashion-MNIST grids)

For each grid directory (``indistill grid`` output: ``shared/``, ``cells/s<seed>/<arm>/``,
``grid.json``) it reads every run's ``metrics.jsonl`` (seconds and images/s per epoch),
``results.json`` (the run's wall time) and ``log.txt`` (timestamps), and reports:

- the shared sources: per stage (teacher, auxiliary cross-entropy, auxiliary PKT) the epochs,
  training seconds and images/s, and the rest of the run's wall (evaluation, start-up);
- the cells, per arm (mean over seeds): wall, training seconds per phase (warmup taps,
  embedding, KD) with images/s, and the rest (evaluation of the final student, start-up);
- the schedule: the grid's elapsed time from its logs' first to last timestamp, the cells'
  worker-seconds, and the makespan of those cells replayed on the grid's workers in the grid's
  order (start each cell on the first free worker), to check the replay against what happened;
- the target: how many minutes a target wall (default 90) leaves for the cells after the
  sources, and the speed-up of the cells (or of everything) that the target would need.

Writes ``benchmarks/results/grid_profile.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import heapq
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from .common import ROOT, table

DEFAULT_GRIDS = ("docs/results/paper_fashion_mnist", "docs/results/methods_fashion_mnist")


def _phase_key(row: dict[str, Any]) -> str:
    """``teacher``, ``auxiliary_ce``, ... for source stages; the phase without its loss name for arms."""
    phase = row.get("phase")
    if not phase:
        return str(row["stage"])
    parts = str(phase).split(":")
    return ":".join(parts[:2])  # warmup:stage1:mse -> warmup:stage1, kd:pkt -> kd:pkt


def _timestamps(log: Path) -> tuple[dt.datetime | None, dt.datetime | None]:
    first = last = None
    if not log.is_file():
        return None, None
    for line in log.read_text().splitlines():
        try:
            t = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        except ValueError:
            continue
        first = first or t
        last = t
    return first, last


def run_profile(run_dir: Path) -> dict[str, Any] | None:
    """Training seconds, epochs and images/s per stage/phase of one finished run, and the rest of its wall."""
    res_path, metrics_path = run_dir / "results.json", run_dir / "metrics.jsonl"
    if not res_path.is_file() or not metrics_path.is_file():
        return None
    wall = float(json.loads(res_path.read_text())["wall_time_s"])
    phases: dict[str, dict[str, float]] = defaultdict(lambda: {"epochs": 0, "train_s": 0.0, "images": 0.0})
    for line in metrics_path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "time_s" not in row:
            continue
        p = phases[_phase_key(row)]
        p["epochs"] += 1
        p["train_s"] += float(row["time_s"])
        p["images"] += float(row["time_s"]) * float(row.get("images_per_s", 0.0))
    out = {k: {"epochs": int(v["epochs"]), "train_s": v["train_s"],
               "images_per_s": v["images"] / v["train_s"] if v["train_s"] > 0 else None} for k, v in phases.items()}
    train = sum(v["train_s"] for v in out.values())
    first, last = _timestamps(run_dir / "log.txt")
    return {"wall_s": wall, "train_s": train, "other_s": wall - train, "phases": out,
            "first_log": first.isoformat(sep=" ") if first else None, "last_log": last.isoformat(sep=" ") if last else None}


def list_schedule(durations: list[float], workers: int) -> float:
    """Makespan of running ``durations`` in order, each on the first worker that is free."""
    free = [0.0] * max(1, workers)
    heapq.heapify(free)
    end = 0.0
    for d in durations:
        start = heapq.heappop(free)
        heapq.heappush(free, start + d)
        end = max(end, start + d)
    return end


def profile_grid(root: Path, target_min: float = 90.0) -> dict[str, Any]:
    """The profile of one grid directory (see the module docstring)."""
    grid = json.loads((root / "grid.json").read_text()) if (root / "grid.json").is_file() else {}
    shared = run_profile(root / "shared")
    cells: list[tuple[int, str, dict[str, Any]]] = []
    arm_order = [a["name"] for a in (grid.get("config") or {}).get("arms", [])]
    for res in root.glob("cells/s*/*/results.json"):
        prof = run_profile(res.parent)
        if prof is not None:
            cells.append((int(res.parent.parent.name[1:]), res.parent.name, prof))
    rank = {a: i for i, a in enumerate(arm_order)}
    cells.sort(key=lambda c: (c[0], rank.get(c[1], len(rank)), c[1]))  # the grid's order: seed, then arm
    arms: dict[str, dict[str, Any]] = {}
    for _, arm, prof in cells:
        a = arms.setdefault(arm, {"cells": 0, "wall_s": 0.0, "train_s": 0.0, "other_s": 0.0, "phases": {}})
        a["cells"] += 1
        for k in ("wall_s", "train_s", "other_s"):
            a[k] += prof[k]
        for ph, v in prof["phases"].items():
            p = a["phases"].setdefault(ph, {"epochs": 0, "train_s": 0.0, "images": 0.0})
            p["epochs"] += v["epochs"]
            p["train_s"] += v["train_s"]
            p["images"] += v["train_s"] * (v["images_per_s"] or 0.0)
    for a in arms.values():
        n = a["cells"]
        for k in ("wall_s", "train_s", "other_s"):
            a[k] /= n
        a["phases"] = {ph: {"epochs_per_cell": p["epochs"] / n, "train_s_per_cell": p["train_s"] / n,
                            "images_per_s": p["images"] / p["train_s"] if p["train_s"] else None}
                       for ph, p in a["phases"].items()}
    workers = int(grid.get("workers") or 1)
    walls = [p["wall_s"] for _, _, p in cells]
    stamps = [s for prof in [shared, *(p for _, _, p in cells)] if prof for s in (prof["first_log"], prof["last_log"]) if s]
    elapsed = None
    if stamps:
        elapsed = (dt.datetime.fromisoformat(max(stamps)) - dt.datetime.fromisoformat(min(stamps))).total_seconds()
    sources_s = shared["wall_s"] if shared else 0.0
    makespan = list_schedule(walls, workers)
    target_s = 60.0 * target_min
    left = target_s - sources_s
    return {
        "grid": str(root.relative_to(ROOT)) if root.is_relative_to(ROOT) else str(root),
        "command": grid.get("command"),
        "grid_json_wall_s": grid.get("wall_time_s"),
        "workers": workers,
        "threads": grid.get("threads"),
        "cells_done": len(cells),
        "elapsed_s_from_logs": elapsed,
        "sources": shared,
        "arms": arms,
        "cells_worker_s": sum(walls),
        "cells_makespan_s": makespan,
        "sources_plus_makespan_s": sources_s + makespan,
        "target_s": target_s,
        "target_left_for_cells_s": left,
        "cells_speedup_needed": makespan / left if left > 0 else None,
        "overall_speedup_needed": (sources_s + makespan) / target_s,
    }


def run(quick: bool = False, grids: list[str] | None = None, target_min: float = 90.0) -> dict[str, Any]:
    """Profiles of the given (default: the committed Fashion-MNIST) grid directories that exist."""
    out = {}
    for g in grids or DEFAULT_GRIDS:
        root = (ROOT / g) if not Path(g).is_absolute() else Path(g)
        if (root / "shared").is_dir() or (root / "cells").is_dir():
            out[root.name] = profile_grid(root, target_min)
    return {"grids": out, "target_min": target_min}


def _m(s: float | None) -> str:
    return "-" if s is None else f"{s / 60:.1f}"


def render(payload: dict[str, Any]) -> list[str]:
    lines = ["Read from finished grid directories (`python -m benchmarks.grid_profile`); minutes unless said.",
             "`other` = a run's wall minus its training epochs: evaluation, periodic test top-1, start-up.", ""]
    for name, g in (payload.get("grids") or {}).items():
        lines += [f"### {name}", "", f"`{g.get('command')}`: {g['cells_done']} cells done, {g['workers']} workers x "
                  f"{g.get('threads')} threads.", ""]
        src = g.get("sources")
        if src:
            rows = [[k, v["epochs"], _m(v["train_s"]), v["images_per_s"]] for k, v in src["phases"].items()]
            rows.append(["other (evaluate teacher and auxiliary, start-up)", "-", _m(src["other_s"]), "-"])
            rows.append(["**sources total**", "-", _m(src["wall_s"]), "-"])
            lines += table(["shared stage", "epochs", "min", "img/s"], rows) + [""]
        rows = []
        for arm, a in g["arms"].items():
            ph = "; ".join(f"{k} {v['epochs_per_cell']:.0f} ep {_m(v['train_s_per_cell'])} min "
                           f"{(v['images_per_s'] or 0):,.0f} img/s" for k, v in a["phases"].items())
            rows.append([arm, a["cells"], _m(a["wall_s"]), _m(a["train_s"]), _m(a["other_s"]), ph])
        lines += table(["arm", "cells", "wall per cell", "training", "other", "phases (per cell)"], rows) + [""]
        rows = [
            ["elapsed, first to last log line", _m(g.get("elapsed_s_from_logs"))],
            ["cells, worker-minutes", _m(g["cells_worker_s"])],
            [f"cells replayed on {g['workers']} workers (makespan)", _m(g["cells_makespan_s"])],
            ["sources + cells makespan", _m(g["sources_plus_makespan_s"])],
            [f"target {g['target_s'] / 60:.0f} min: left for the cells after the sources", _m(g["target_left_for_cells_s"])],
            ["speed-up of the cells the target needs", g.get("cells_speedup_needed")],
            ["speed-up of everything the target needs", g.get("overall_speedup_needed")],
        ]
        lines += table(["schedule", "value"], rows) + [""]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.grid_profile", description=__doc__.splitlines()[0])
    ap.add_argument("grids", nargs="*", help="grid directories (default: the committed Fashion-MNIST grids)")
    ap.add_argument("--target-min", type=float, default=90.0, help="the wall-time target to size against")
    ap.add_argument("--print-only", action="store_true", help="print the tables, write no JSON")
    args = ap.parse_args(argv)
    payload = run(grids=args.grids or None, target_min=args.target_min)
    print("\n".join(render(payload)))
    if not args.print_only:
        from .common import load_average, machine_info, write_result
        payload.update({"benchmark": "grid_profile", "machine": machine_info(), "load_before": load_average(),
                        "load_after": load_average(), "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
                        "command": "python -m benchmarks.grid_profile " + " ".join(argv if argv is not None else sys.argv[1:])})
        print(f"wrote {write_result('grid_profile', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
