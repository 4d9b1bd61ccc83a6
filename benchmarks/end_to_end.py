"""Wall time of whole CLI runs: ``indistill demo`` and (``--full`` only) ``indistill run configs/fashion_mnist.yaml``.

Each command runs as its own process in a temporary ``out_dir`` with ``progress=false``. In quick
mode the demo's epoch counts are scaled down by overrides (and the result says so), because the
full demo takes several minutes on a loaded 2-core machine.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import ROOT, table

# Every arm runs 8 epochs (one budget): the InDistill arm's tap phases take 1+2+3 of them (a=0), then
# 2 KD epochs; the arms without warmup run their method all 8.
QUICK_DEMO = ["teacher.train.epochs=3", "warmup.a=0", "student.train.epochs=8"]


def demo_config(quick: bool, out_dir: str = "runs"):
    """The config ``indistill demo`` runs in this benchmark (quick: with ``QUICK_DEMO``)."""
    from indistill.cli import packaged_config
    from indistill.config import load_config

    return load_config(packaged_config("demo_digits.yaml"), [*(QUICK_DEMO if quick else []), f"out_dir={out_dir}"])


def _indistill() -> list[str]:
    exe = Path(sys.executable).with_name("indistill")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "indistill"]


def time_command(args: list[str], timeout: float) -> dict[str, Any]:
    """Run ``indistill <args>`` in a fresh temp out_dir; wall time, exit status and the last stderr line."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [*_indistill(), *args, f"out_dir={tmp}", "progress=false"]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"command": " ".join(["indistill", *args]), "error": f"timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - t0
    out: dict[str, Any] = {"command": " ".join(["indistill", *args, "out_dir=<tmp>", "progress=false"]),
                           "wall_s": wall, "returncode": proc.returncode}
    if proc.returncode != 0:
        out["error"] = ((proc.stderr or proc.stdout).strip().splitlines() or ["?"])[-1][:300]
    return out


def run(quick: bool, full: bool = False) -> dict[str, Any]:
    rows = []
    demo_args = ["demo", *QUICK_DEMO] if quick else ["demo"]
    print(f"  indistill {' '.join(demo_args)}", flush=True)
    r = time_command(demo_args, timeout=1800)
    r["note"] = "quick: epochs scaled down by overrides" if quick else "the demo as shipped"
    rows.append(r)
    if full:
        cfg = ROOT / "configs" / "fashion_mnist.yaml"
        if cfg.is_file():
            print("  indistill run configs/fashion_mnist.yaml", flush=True)
            rows.append(time_command(["run", str(cfg.relative_to(ROOT))], timeout=6 * 3600))
        else:
            rows.append({"command": "indistill run configs/fashion_mnist.yaml", "skipped": "configs/fashion_mnist.yaml does not exist"})
    return {"cases": rows}


def render(payload: dict[str, Any]) -> list[str]:
    rows = payload.get("cases", [])
    return table(["command", "wall s", "exit", "note"],
                 [[f"`{r.get('command')}`", r.get("wall_s"), r.get("returncode"),
                   r.get("error") or r.get("skipped") or r.get("note", "")] for r in rows])
