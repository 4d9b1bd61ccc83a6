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

The modules, in the order a grid uses them:

- :mod:`.running`: the cells, their shared sources, the order they run in, the worker processes, the lock;
- :mod:`.record`: what a grid directory remembers (``grid_command.json``, the last ``grid.json``, the
  finished cells' arms), so a grid resumes and ``--report-only`` re-renders it as it ran;
- :mod:`.stats`: which arms are compared, per-arm description, paired differences, CIs, detectable difference;
- :mod:`.reporting`: ``grid.json``, ``grid.md`` and the plots;
- :mod:`.command`: ``indistill grid`` and its arguments.
"""

from __future__ import annotations

from .command import add_grid_parser, cmd_grid
from .record import COMMAND_FILE, arms_on_disk, grid_record, read_json, reported_cells
from .reporting import grid_markdown, plot_grid, win_label, write_report
from .running import ORDERS, Cell, Grid, cell_dir, default_workers, grid_eta, run_cells, run_grid, schedule
from .stats import HEADLINE, POWER, comparisons, describe, paired, pairs_of, summarise

__all__ = [
    "COMMAND_FILE", "HEADLINE", "ORDERS", "POWER", "Cell", "Grid", "add_grid_parser", "arms_on_disk", "cell_dir",
    "cmd_grid", "comparisons", "default_workers", "describe", "grid_eta", "grid_markdown", "grid_record", "paired",
    "pairs_of", "plot_grid", "read_json", "reported_cells", "run_cells", "run_grid", "schedule", "summarise",
    "win_label", "write_report",
]
