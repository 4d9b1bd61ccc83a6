"""`indistill grid`: paired statistics checked against a direct computation from the cells' JSON, and
parallel workers giving the same cells as a sequential grid."""

import json
import math
import shutil

import pytest
from scipy import stats

from indistill.cli import main
from indistill.errors import UserError
from indistill.grid import paired, summarise
from indistill.config import ArmSpec

ARGS = ["configs/demo_digits.yaml", "--seeds", "2", "--threads", "1", "data.train_subset=200", "data.test_subset=100",
        "teacher.train.epochs=2", "student.train.epochs=8", "warmup.a=0", "evaluate.protocols=[standard]",
        "arms=[{name: kd, warmup: none, method: kd}, {name: indistill_kd, warmup: indistill, method: kd}]"]


def _cells(root):
    out = {}
    for seed in (0, 1):
        for arm in ("kd", "indistill_kd"):
            res = json.loads((root / "cells" / f"s{seed}" / arm / "results.json").read_text())
            out[(seed, arm)] = res["models"][arm]
    return out


def test_grid_pairs_arms_and_its_statistics_match_a_direct_computation(tmp_path, capsys):
    assert main(["grid", *ARGS, "--workers", "2", f"out_dir={tmp_path / 'par'}"]) == 0
    root = tmp_path / "par" / "demo_digits"
    grid = json.loads((root / "grid.json").read_text())["summary"]
    cells = _cells(root)
    for metric in ("top1", "retrieval/cosine/standard/map"):
        d = [cells[(s, "indistill_kd")][metric] - cells[(s, "kd")][metric] for s in (0, 1)]
        mean = sum(d) / 2
        sd = math.sqrt(sum((x - mean) ** 2 for x in d))  # n - 1 = 1
        half = stats.t.ppf(0.975, 1) * sd / math.sqrt(2)
        got = grid["paired"]["indistill_kd"]["metrics"][metric]
        assert got["mean"] == pytest.approx(mean) and got["ci_half"] == pytest.approx(half)
        assert got["wins"] == sum(x > 0 for x in d)
        vals = [cells[(s, "kd")][metric] for s in (0, 1)]
        assert grid["arms"]["kd"][metric]["mean"] == pytest.approx(sum(vals) / 2)
        assert grid["arms"]["kd"][metric]["min"] == min(vals)
    # paired: within a seed both arms started from the same student (same seed in each cell's config)
    for seed in (0, 1):
        for arm in ("kd", "indistill_kd"):
            assert f"seed: {seed}\n" in (root / "cells" / f"s{seed}" / f"{arm}.yaml").read_text()
    assert (root / "grid.md").is_file() and list((root / "plots").glob("grid_*.png"))
    assert "indistill_kd - kd" in (root / "grid.md").read_text()
    # a re-run finds every cell finished and trains nothing
    n = {p: p.stat().st_mtime_ns for p in root.glob("cells/*/*/results.json")}
    assert main(["grid", *ARGS, "--workers", "2", f"out_dir={tmp_path / 'par'}"]) == 0
    assert {p: p.stat().st_mtime_ns for p in root.glob("cells/*/*/results.json")} == n

    # sequential cells (1 worker, same threads per cell) give the same numbers, bit for bit
    seq = tmp_path / "seq" / "demo_digits"
    seq.mkdir(parents=True)
    shutil.copytree(root / "shared", seq / "shared")  # the same shared teacher, as the grid would reuse it
    assert main(["grid", *ARGS, "--workers", "1", f"out_dir={tmp_path / 'seq'}"]) == 0
    assert {k: v["top1"] for k, v in _cells(seq).items()} == {k: v["top1"] for k, v in cells.items()}
    assert {k: v["retrieval/cosine/standard/map"] for k, v in _cells(seq).items()} == \
        {k: v["retrieval/cosine/standard/map"] for k, v in cells.items()}

    # --report-only never replaces the report of a finished grid with a less complete one
    md = (root / "grid.md").read_text()
    (root / "cells" / "s1" / "kd" / "results.json").unlink()
    assert main(["grid", *ARGS, "--report-only", f"out_dir={tmp_path / 'par'}"]) == 2
    assert "refusing to replace" in capsys.readouterr().err and (root / "grid.md").read_text() == md
    # --report-only on an unfinished grid (still running: no grid.json yet): trains nothing, reports the
    # finished cells and says so
    (root / "grid.json").unlink()
    assert main(["grid", *ARGS, "--report-only", f"out_dir={tmp_path / 'par'}"]) == 0
    assert not (root / "cells" / "s1" / "kd" / "results.json").exists()
    out = json.loads((root / "grid.json").read_text())
    assert (out["cells_finished"], out["cells_total"], out["wall_time_s"]) == (3, 4, None)
    assert out["summary"]["paired"]["indistill_kd"]["seeds"] == [0]
    assert "**Unfinished: 3 of 4 cells.**" in (root / "grid.md").read_text()
    assert main(["grid", *ARGS, "--report-only", f"out_dir={tmp_path / 'empty'}"]) == 2
    assert "no finished cells" in capsys.readouterr().err


def test_paired_statistics_by_hand():
    p = paired([0.5, -0.1, 0.3])
    assert p["mean"] == pytest.approx(0.7 / 3)
    sd = math.sqrt(((0.5 - 0.7 / 3) ** 2 + (-0.1 - 0.7 / 3) ** 2 + (0.3 - 0.7 / 3) ** 2) / 2)
    assert p["std"] == pytest.approx(sd)
    assert p["ci_half"] == pytest.approx(4.302652729911275 * sd / math.sqrt(3))  # t(0.975, 2)
    assert p["mde80"] == pytest.approx((4.302652729911275 + 1.0606601717798212) * sd / math.sqrt(3))  # + t(0.8, 2)
    assert (p["wins"], p["losses"]) == (2, 1)
    arms = [ArmSpec("m", "none", "kd", {}), ArmSpec("w", "indistill", "kd", {}), ArmSpec("c", "none", "ce", {})]
    s = summarise({0: {"m": {"top1": 80.0}, "w": {"top1": 81.0}, "c": {"top1": 70.0}},
                   1: {"m": {"top1": 82.0}, "w": {"top1": 82.5}, "c": {"top1": 71.0}}}, arms)
    assert list(s["paired"]) == ["w"] and s["paired"]["w"]["baseline"] == "m"
    assert s["paired"]["w"]["metrics"]["top1"]["values"] == [1.0, 0.5]



def test_an_arm_without_warmup_is_paired_only_with_the_baselines_it_names():
    from indistill.grid import comparisons

    arms = [ArmSpec("pkt", "none", "pkt", {}), ArmSpec("pkt_epoch", "none", "pkt", {}, baseline=["pkt"]),
            ArmSpec("w", "indistill", "pkt", {}, baseline=["pkt", "pkt_epoch"]), ArmSpec("c", "none", "ce", {})]
    assert comparisons(arms) == [("pkt_epoch", "pkt_epoch", "pkt"), ("w vs pkt", "w", "pkt"),
                                 ("w vs pkt_epoch", "w", "pkt_epoch")]
    s = summarise({0: {"pkt": {"top1": 80.0}, "pkt_epoch": {"top1": 80.5}, "w": {"top1": 81.0}},
                   1: {"pkt": {"top1": 82.0}, "pkt_epoch": {"top1": 81.0}, "w": {"top1": 82.5}}}, arms)
    assert s["paired"]["pkt_epoch"]["metrics"]["top1"]["values"] == [0.5, -1.0]

def test_grid_eta_weights_each_arm_by_its_own_finished_cells():
    from indistill.grid import grid_eta

    by_arm = {"kd": [60.0, 80.0], "crd": [600.0]}  # kd 70 s per cell, crd 600 s, overall mean 740 / 3
    # todo: kd, crd and an arm with nothing finished (overall mean); running: a kd cell 50 s in (20 s left)
    # and a crd cell 700 s in (over its estimate: 0 left); 2 workers share the work.
    eta = grid_eta(["kd", "crd", "at"], [("kd", 50.0), ("crd", 700.0)], by_arm, workers=2)
    assert eta == pytest.approx((70 + 600 + 740 / 3 + 20 + 0) / 2)
    assert grid_eta(["kd"], [], {}, workers=2) == 0.0  # nothing finished: no estimate yet


def test_schedule_orders_cells_by_seed_or_by_method_pair(tmp_path):
    from indistill.config import ArmSpec
    from indistill.grid import Cell, schedule

    arms = [ArmSpec("ce", "none", "ce"), ArmSpec("indistill_kd", "indistill", "kd"), ArmSpec("kd", "none", "kd"),
            ArmSpec("crd", "none", "crd"), ArmSpec("indistill_crd", "indistill", "crd")]
    cells = [Cell(s, a, tmp_path / f"s{s}" / a.name, tmp_path / f"s{s}" / f"{a.name}.yaml") for s in (0, 1) for a in arms]
    assert [c.label for c in schedule(cells, arms, "seeds")] == [c.label for c in cells]
    assert [c.label for c in schedule(cells, arms, "pairs")] == [
        "s0/ce", "s1/ce",
        "s0/indistill_kd", "s0/kd", "s1/indistill_kd", "s1/kd",  # a pair together, in the config's arm order
        "s0/crd", "s0/indistill_crd", "s1/crd", "s1/indistill_crd"]
    with pytest.raises(UserError, match="not one of"):
        schedule(cells, arms, "random")


TWO_ARMS = "arms=[{name: kd, warmup: none, method: kd}, {name: indistill_kd, warmup: indistill, method: kd}]"


def _finished_grid(tmp_path, seeds=(0, 1)):
    """A finished grid of demo_digits with the arms of an ``arms=`` override, made without training: cell
    configs written by the grid itself, results.json files with made-up numbers (the warmup arm wins by 0.5)."""
    from indistill.config import load_config
    from indistill.grid import Grid

    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"")  # never read: every cell has finished
    overrides = [f"out_dir={tmp_path / 'out'}", f"teacher.checkpoint={teacher}", TWO_ARMS]
    grid = Grid(load_config("configs/demo_digits.yaml", overrides), list(seeds))
    (grid.root / "shared").mkdir(parents=True)
    (grid.root / "shared" / "results.json").write_text("{}")  # the shared sources count as trained
    for c in grid.cells():
        grid.write_cell_config(c)
        c.dir.mkdir(parents=True)
        top1 = 90.0 + c.seed + (0.5 if c.arm.warmup == "indistill" else 0.0)
        res = {c.arm.name: {"top1": top1, "retrieval/cosine/standard/map": top1 / 100}}
        (c.dir / "results.json").write_text(json.dumps({"models": res}))
    return grid.root, overrides


def test_a_grid_remembers_its_overrides_and_its_report_never_goes_backwards(tmp_path, capsys):
    root, overrides = _finished_grid(tmp_path)
    cfg = "configs/demo_digits.yaml"
    where = f"out_dir={tmp_path / 'out'}"
    # every cell has finished, so this trains nothing; the directory records how the grid was run
    assert main(["grid", cfg, "--seeds", "2", "--workers", "1", *overrides]) == 0
    rec = json.loads((root / "grid_command.json").read_text())
    assert (rec["config"], rec["seeds"], rec["order"], rec["overrides"]) == (cfg, 2, "seeds", overrides)
    md = (root / "grid.md").read_text()
    command = json.loads((root / "grid.json").read_text())["command"]
    assert TWO_ARMS in command and "**Unfinished" not in md
    # one notation for wins: seeds won of seeds paired
    assert "| indistill_kd - kd | +0.50 [+0.50, +0.50] 2/2 won |" in md

    # --report-only with neither the arms nor --seeds: the recorded ones are reused, the report is the same
    capsys.readouterr()
    assert main(["grid", cfg, "--report-only", where]) == 0
    assert (root / "grid.md").read_text() == md
    assert json.loads((root / "grid.json").read_text())["command"] == command

    # a less complete report (fewer seeds) is refused in one line; the finished report stays as it was
    assert main(["grid", cfg, "--seeds", "1", "--report-only", where]) == 2
    err = capsys.readouterr().err
    assert "refusing to replace" in err and "reports 4 finished cells, with a report of 2" in err
    assert len(err.strip().splitlines()) == 1 and (root / "grid.md").read_text() == md
    assert main(["grid", cfg, "--seeds", "1", *overrides]) == 2  # nor does a smaller grid run into it
    assert "refusing to run a grid of 2 cells" in capsys.readouterr().err

    # a grid reported before grid_command.json existed: the config its grid.json recorded gives the arms
    (root / "grid_command.json").unlink()
    assert main(["grid", cfg, "--seeds", "2", "--report-only", where]) == 0
    assert (root / "grid.md").read_text() == md

    # nothing recorded at all: the finished cells are found under the arm names they ran with
    # (the config's own arms, student_ce, ..., have none)
    (root / "grid.json").unlink()
    assert main(["grid", cfg, "--seeds", "2", "--report-only", where]) == 0
    out = json.loads((root / "grid.json").read_text())
    assert (out["cells_finished"], out["cells_total"]) == (4, 4)
    assert list(out["summary"]["arms"]) == ["kd", "indistill_kd"] and list(out["summary"]["paired"]) == ["indistill_kd"]


def test_grid_plots_put_each_warmup_arm_beside_its_base_and_show_the_paired_difference(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from indistill import report
    from indistill.grid import plot_grid

    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path, dpi=110: figures.append(fig))
    arms = [ArmSpec("kd", "none", "kd", {}), ArmSpec("dkd", "none", "dkd", {}),
            ArmSpec("indistill_kd", "indistill", "kd", {}), ArmSpec("indistill_dkd", "indistill", "dkd", {})]
    results = {s: {"kd": {"top1": 80.0 + s}, "dkd": {"top1": 70.0 + s}, "indistill_kd": {"top1": 81.0 + 2 * s},
                   "indistill_dkd": {"top1": 69.0 + s}} for s in (0, 1, 2)}
    summary = summarise(results, arms)
    plot_grid(summary, results, tmp_path)
    (fig,) = figures
    per_arm, diff = fig.axes
    assert [t.get_text() for t in per_arm.get_xticklabels()] == ["kd", "indistill_kd", "dkd", "indistill_dkd"]
    assert [t.get_text() for t in diff.get_xticklabels()] == ["indistill_kd - kd", "indistill_dkd - dkd"]
    # per seed: the paired differences (1, 2, 3) and (-1, -1, -1); a zero line
    points = [sorted(float(y) for y in c.get_offsets()[:, 1]) for c in diff.collections if len(c.get_offsets()) == 3]
    assert points == [[1.0, 2.0, 3.0], [-1.0, -1.0, -1.0]]
    assert any(list(line.get_ydata()) == [0.0, 0.0] for line in diff.get_lines())
    # the mean and its 95% CI: the errorbar of the first comparison spans mean -/+ t(0.975, 2) * sd / sqrt(3)
    p = summary["paired"]["indistill_kd"]["metrics"]["top1"]
    means = [line for line in diff.get_lines() if line.get_marker() == "D"]
    assert float(means[0].get_ydata()[0]) == pytest.approx(2.0)
    caps = sorted(float(y) for line in diff.get_lines() if line.get_marker() == "_" for y in line.get_ydata())
    assert caps[-1] == pytest.approx(p["ci_high"]) and p["ci_low"] == pytest.approx(2.0 - stats.t.ppf(0.975, 2) / math.sqrt(3))


def test_only_trains_the_named_arms_and_the_report_still_covers_every_arm(tmp_path, capsys):
    where = f"out_dir={tmp_path / 'out'}"
    one_seed = [a if a != "2" else "1" for a in ARGS]  # ARGS with --seeds 1
    assert main(["grid", *one_seed, where]) == 0
    root = tmp_path / "out" / "demo_digits"
    # a name that is not an arm, and --only with --report-only: one line each, nothing trained
    assert main(["grid", *ARGS, "--only", "kd,indistill_pkt", where]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "--only: 'indistill_pkt' is not an arm" in errors[0] and "Traceback" not in err
    assert main(["grid", *ARGS, "--only", "kd", "--report-only", where]) == 2
    assert "--only chooses the cells" in capsys.readouterr().err
    assert not (root / "cells" / "s1").exists()

    # a second seed for kd only: indistill_kd's cell of that seed is neither trained nor configured
    assert main(["grid", *ARGS, "--only", "kd", where]) == 0
    assert (root / "cells" / "s1" / "kd" / "results.json").is_file()
    assert not (root / "cells" / "s1" / "indistill_kd").exists() and not (root / "cells" / "s1" / "indistill_kd.yaml").exists()
    rec = json.loads((root / "grid_command.json").read_text())
    assert rec["only"] == ["kd"] and rec["seeds"] == 2 and " --only kd " in rec["command"]
    out = json.loads((root / "grid.json").read_text())
    assert (out["cells_finished"], out["cells_total"]) == (3, 4)
    summary = out["summary"]
    assert summary["arms"]["kd"]["top1"]["n"] == 2 and summary["arms"]["indistill_kd"]["top1"]["n"] == 1
    assert summary["paired"]["indistill_kd"]["seeds"] == [0]
    md = (root / "grid.md").read_text()
    assert "| indistill_kd (1 of 2 seeds) |" in md and "| kd |" in md
    assert "**Unfinished: 3 of 4 cells.**" in md and "(--only)" in md
    # re-rendered from the record alone (no --seeds, no arms), the report is the same
    assert main(["grid", "configs/demo_digits.yaml", "--report-only", where]) == 0
    assert (root / "grid.md").read_text() == md
