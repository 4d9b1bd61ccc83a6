"""Running a grid's cells: the cells of a config over seeds, their shared teacher/auxiliary, the order
they run in, the worker processes that run them (with progress and an ETA), and the directory lock.

Every piece resumes on its own: finished sources and cells (``results.json``) are found and skipped, a
cell's config is rewritten only while it has not finished, and each cell is an ordinary ``indistill run``
of its own config in a subprocess, so a killed grid continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_json, atomic_write_text
from ..config import ArmSpec, Config, dump_config, resolve_arms
from ..errors import UserError, suggest
from ..rundir import RunDir
from .record import COMMAND_FILE
from .stats import pairs_of

#: the orders ``--order`` runs cells in (see :func:`schedule`)
ORDERS = ("seeds", "pairs", "arms")


def cell_dir(root: Path, seed: int, arm: str) -> Path:
    return root / "cells" / f"s{seed}" / arm


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
        from ..pipeline import Pipeline

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


def _start_cell(cell: Cell, env: dict[str, str]) -> tuple[subprocess.Popen, Any]:
    """``indistill run <cell config>`` in a subprocess whose output goes to ``<arm>.log`` beside the cell."""
    cell.dir.parent.mkdir(parents=True, exist_ok=True)
    logf = open(cell.dir.parent / f"{cell.arm.name}.log", "a")
    cmd = [sys.executable, "-m", "indistill", "run", str(cell.config)]
    return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env), logf


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
            proc, logf = _start_cell(c, env)
            running.append((c, proc, time.perf_counter(), logf))
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


def run_grid(grid: Grid, cells: list[Cell], *, record: dict[str, Any], reported: int | None, order: str,
             workers: int, threads: int, only: list[str] | None = None, log=print) -> None:
    """Train what ``cells`` lack, holding the grid directory's lock: record how the grid runs (``record``,
    written to ``grid_command.json``), train the shared sources, write each cell's config, run the cells.

    One grid per directory: a second one would run (and fail) the same cells beside the first. A report
    (``--report-only``) takes no lock: it is how one looks at a grid that is still running. A grid of fewer
    cells than the directory's report (``reported``) is refused: it would replace that report.
    ``only``: train just these arms' cells (the grid and its report still have every arm).
    """
    held = RunDir(grid.root)
    held.lock()
    held.remove_temp_files(tuple(f"cells/s{s}" for s in grid.seeds))  # the cell configs this grid writes
    try:
        if reported is not None and len(cells) < reported:
            raise UserError(
                f"refusing to run a grid of {len(cells)} cells ({len(grid.seeds)} seeds x {len(grid.arms)} arms) into "
                f"{grid.root}, whose grid.md reports {reported} finished cells; give the seeds and arms it ran "
                f"with, or use another directory (out_dir=... or name=...)")
        atomic_write_json(grid.root / COMMAND_FILE, record)
        grid.train_sources(log=log)
        todo = [c for c in cells if only is None or c.arm.name in only]
        for c in todo:
            grid.write_cell_config(c)
        log(f"grid: {len(cells)} cells ({len(grid.seeds)} seeds x {len(grid.arms)} arms), {workers} workers x {threads} threads"
            + (f"; training only the {len(todo)} cells of {', '.join(only)}" if only is not None else ""))
        run_cells(schedule(todo, grid.arms, order), workers=workers, threads=threads, log=log)
    finally:
        held.unlock()
