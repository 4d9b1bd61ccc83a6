"""The committed grids under docs/results agree with their cells: every finished cell's numbers are the ones
grid.json holds, and every per-arm statistic and paired interval in grid.json is recomputed here from the
cells' results.json files, independently of ``indistill.grid.stats`` (numpy float64, Student t quantiles
from a table)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
GRIDS = sorted(p.parent for p in RESULTS.glob("*/grid.json"))

# Two-sided 95% Student t quantiles t(0.975, df), from a printed table (8 significant digits).
T975 = {1: 12.706205, 2: 4.3026527, 3: 3.1824463, 4: 2.7764451, 5: 2.5705818, 6: 2.4469119, 7: 2.3646243,
        8: 2.3060041, 9: 2.2621572}


def _cells(grid: Path) -> dict[int, dict[str, dict]]:
    out: dict[int, dict[str, dict]] = {}
    for res in sorted(grid.glob("cells/s*/*/results.json")):
        seed, arm = int(res.parent.parent.name[1:]), res.parent.name
        out.setdefault(seed, {})[arm] = json.loads(res.read_text())["models"][arm]
    return out


def test_there_are_committed_grids():
    assert {g.name for g in GRIDS} >= {"paper_fashion_mnist", "methods_fashion_mnist"}


@pytest.mark.parametrize("grid", GRIDS, ids=lambda p: p.name)
def test_grid_json_holds_exactly_the_finished_cells(grid):
    g = json.loads((grid / "grid.json").read_text())
    on_disk = _cells(grid)
    in_json = {int(s): arms for s, arms in g["cells"].items()}
    assert {s: set(a) for s, a in in_json.items() if a} == {s: set(a) for s, a in on_disk.items()}, \
        f"{grid.name}: re-render with `indistill grid <config> --report-only ...`"
    for s, arms in on_disk.items():
        for arm, res in arms.items():
            # grid.json keeps every number but the PR curves (those stay in the cell)
            assert in_json[s][arm] == {k: v for k, v in res.items() if k != "pr_curves"}, f"{grid.name} s{s}/{arm}"
    assert g["cells_finished"] == sum(len(a) for a in on_disk.values())


@pytest.mark.parametrize("grid", GRIDS, ids=lambda p: p.name)
def test_grid_statistics_recomputed_from_the_cells(grid):
    g = json.loads((grid / "grid.json").read_text())
    cells, summary = _cells(grid), g["summary"]
    checked = 0
    for arm, stats in summary["arms"].items():
        for metric, st in stats.items():
            vals = np.array([cells[s][arm][metric] for s in sorted(cells) if arm in cells[s]], dtype=np.float64)
            assert st["n"] == len(vals)
            assert st["mean"] == pytest.approx(vals.mean(), abs=1e-12)
            if len(vals) > 1:
                assert st["std"] == pytest.approx(vals.std(ddof=1), abs=1e-12)
            checked += 1
    for key, p in summary["paired"].items():
        warm, base = p["arm"], p["baseline"]
        seeds = [s for s in sorted(cells) if warm in cells[s] and base in cells[s]]
        assert p["seeds"] == seeds, f"{grid.name} {key}"
        for metric, st in p["metrics"].items():
            d = np.array([cells[s][warm][metric] - cells[s][base][metric] for s in seeds], dtype=np.float64)
            assert st["mean"] == pytest.approx(d.mean(), abs=1e-12)
            assert st["wins"] == int((d > 0).sum()) and st["losses"] == int((d < 0).sum())
            if len(d) > 1:
                half = T975[len(d) - 1] * d.std(ddof=1) / np.sqrt(len(d))
                assert st["ci_half"] == pytest.approx(half, rel=1e-6)
                assert st["ci_low"] == pytest.approx(d.mean() - half, rel=1e-6, abs=1e-9)
                assert st["ci_high"] == pytest.approx(d.mean() + half, rel=1e-6, abs=1e-9)
            checked += 1
    assert checked > 0
