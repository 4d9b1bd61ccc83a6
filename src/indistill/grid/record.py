"""What a grid directory remembers, so a grid resumes and re-renders as it ran: ``grid_command.json`` (how
it was run), the ``grid.json`` of its last report (how many cells that report covered, and for a grid run
before ``grid_command.json`` existed, its command line and resolved config), and the configs of its
finished cells (the arms they ran with).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..config import ArmSpec, load_config, resolve_arms
from ..errors import UserError

#: written when a grid starts: how it was run, so ``--report-only`` re-renders that same grid
COMMAND_FILE = "grid_command.json"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object the grid wrote, or a one-line error naming the damaged file."""
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
        return read_json(root / COMMAND_FILE)
    if not (root / "grid.json").is_file():
        return None
    old = read_json(root / "grid.json")
    command = str(old.get("command", ""))
    seeds = re.search(r" --seeds (\d+)", command)
    order = re.search(r" --order (\w+)", command)
    return {"command": command, "seeds": int(seeds.group(1)) if seeds else len(old.get("cells") or {}) or None,
            "order": order.group(1) if order else "seeds", "overrides": None, "resolved": old.get("config")}


def reported_cells(root: Path) -> int | None:
    """How many finished cells the ``grid.json`` in ``root`` reports; None when there is none."""
    if not (root / "grid.json").is_file():
        return None
    old = read_json(root / "grid.json")
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
