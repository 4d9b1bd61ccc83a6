"""``indistill grid``: the command and its arguments, each step a call into :mod:`.running`,
:mod:`.record` or :mod:`.reporting`."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from ..config import Config, config_from_tree, load_config, resolve_arms
from ..errors import UserError, suggest
from .record import arms_on_disk, grid_record, read_json, reported_cells
from .reporting import write_report
from .running import ORDERS, Cell, Grid, cell_dir, default_workers, run_grid


def _config(args) -> tuple[Config, dict[str, Any] | None]:
    """The config to run, and for ``--report-only`` the record of how the grid in its directory ran."""
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
    return cfg, record


def _with_arms_on_disk(cfg: Config, seeds: list[int], args) -> Config:
    """For ``--report-only`` without ``arms=``: add the arms of finished cells the config does not list."""
    if not args.report_only or any(o.split("=", 1)[0].strip() == "arms" for o in args.overrides):
        return cfg
    root = cfg.run_dir
    listed = resolve_arms(cfg)
    extra = arms_on_disk(root, seeds, [a.name for a in listed])
    if not extra:
        return cfg
    # Arms with no finished cell at all are not this grid's (the config renamed them since): drop them.
    if not any((cell_dir(root, s, a.name) / "results.json").is_file() for s in seeds for a in listed):
        listed = []
    print(f"grid: reporting the finished cells of arms the config does not list: "
          f"{', '.join(a.name for a in extra)}")
    return dataclasses.replace(cfg, arms=[*listed, *extra])


def _command_line(args, n_seeds: int, record: dict[str, Any] | None) -> str:
    """The command a report names: the one that ran the grid when re-rendering it, else this one."""
    if record is not None and record.get("command"):
        return str(record["command"])
    return " ".join(["indistill", "grid", args.config, f"--seeds {n_seeds}",
                     *([f"--workers {args.workers}"] if args.workers else []),
                     *([f"--order {args.order}"] if args.order != "seeds" else []),
                     *([f"--only {args.only}"] if args.only else []), *args.overrides])


def _check_report(grid: Grid, cells: list[Cell], reported: int | None, command: str) -> None:
    """``--report-only`` needs a finished cell, and never replaces a report of more finished cells."""
    done = sum(c.done for c in cells)
    if not done:
        raise UserError(f"no finished cells under {grid.root / 'cells'}; run the grid without --report-only first")
    if reported is not None and done < reported:
        raise UserError(
            f"refusing to replace {grid.root / 'grid.md'}, which reports {reported} finished cells, with a report "
            f"of {done} ({len(grid.seeds)} seeds x {len(grid.arms)} arms); give the seeds and arms the grid ran with "
            f"(`{command}`), or report into another directory (out_dir=...)")
    print(f"grid: reporting {done} of {len(cells)} cells finished (nothing is trained)")


def _only(grid: Grid, args) -> list[str] | None:
    """The arms ``--only`` names (checked against the grid's arms), or None for every arm."""
    if not args.only:
        return None
    if args.report_only:
        raise UserError("--only chooses the cells a grid trains; --report-only trains nothing and always reports "
                        "every arm: drop one of them")
    names = [a.name for a in grid.arms]
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    for n in only:
        if n not in names:
            raise UserError(f"--only: '{n}' is not an arm of the grid{suggest(n, names)}; arms: {', '.join(names)}")
    return only


def _run_and_report(grid: Grid, args, command: str, n_seeds: int, workers: int, threads: int) -> str:
    """Run the grid's unfinished cells (or, for ``--report-only``, check there are finished ones), then write
    grid.json / grid.md; returns the markdown."""
    cells = grid.cells()
    only = _only(grid, args)
    reported = reported_cells(grid.root)
    t0 = time.perf_counter()
    if args.report_only:
        _check_report(grid, cells, reported, command)
    else:
        run_grid(grid, cells, reported=reported, order=args.order, workers=workers, threads=threads, only=only,
                 record={"command": command, "config": args.config, "seeds": n_seeds, "order": args.order,
                         "workers": args.workers, "threads": args.threads, "per_seed_sources": args.per_seed_sources,
                         "only": only, "overrides": list(args.overrides)})
    old = read_json(grid.root / "grid.json") if args.report_only and reported is not None else {}
    wall = old.get("wall_time_s") if args.report_only else time.perf_counter() - t0
    return write_report(grid, cells, command=command, old=old, wall_s=wall, workers=workers, threads=threads)


def cmd_grid(args) -> int:
    cfg, record = _config(args)
    n_seeds = args.seeds if args.seeds is not None else int((record or {}).get("seeds") or 3)
    seeds = [cfg.seed + i for i in range(n_seeds)]
    grid = Grid(_with_arms_on_disk(cfg, seeds, args), seeds, per_seed_sources=args.per_seed_sources)
    workers = args.workers or default_workers()
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
    command = _command_line(args, n_seeds, record)
    print(_run_and_report(grid, args, command, n_seeds, workers, threads))
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
    p.add_argument("--only", default="", metavar="ARM[,ARM...]",
                   help="train only these arms' unfinished cells (e.g. --seeds 5 --only kd,indistill_kd extends one "
                        "comparison to more seeds); the report still covers every arm, each difference paired over "
                        "the seeds where both arms finished")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write grid.json/grid.md from the cells finished so far (a grid still running), "
                        "with the seeds and overrides the grid ran with (grid_command.json); never replaces a report "
                        "of more finished cells")
