"""Shared helpers of the benchmarks: machine info, per-case subprocesses, statistics, results and README.

Every benchmark *case* runs in a fresh interpreter (``python -m benchmarks.<module> --case JSON``)
so peak RSS, torch thread state and compile caches belong to that case alone. The
case prints one line ``BENCH_RESULT {json}``; anything else it prints is kept
only when it fails.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent / "README.md"
MARKER = "BENCH_RESULT "
# Results written by the public-API harness carry this tag; older ones are flagged in the README.
HARNESS = "public-api"
STALE_BEFORE_REBUILD = ("throughput", "memory", "end_to_end")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """Platform, CPU count, torch version and threads, CUDA device (if any)."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "blas": blas_info(),
    }
    return info


def blas_info() -> list[dict[str, Any]]:
    """numpy's BLAS (and any other loaded): library, version, the kernel set it picked, threads.

    The kernel set matters: the float64 matmul of the retrieval path runs ~1.45x faster on OpenBLAS's
    SkylakeX (AVX-512) kernels than on its Haswell (AVX2) ones, and an ``OPENBLAS_CORETYPE`` in the
    environment overrides what OpenBLAS would pick for the CPU.
    """
    import numpy  # noqa: F401  (loads its BLAS, so threadpoolctl sees it)
    from threadpoolctl import threadpool_info

    return [{"library": p.get("internal_api"), "version": p.get("version"),
             "architecture": p.get("architecture"), "threads": p.get("num_threads")}
            for p in threadpool_info() if p.get("user_api") == "blas"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and count of repeated measurements."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def emit(result: dict[str, Any]) -> None:
    """Called by a case subprocess: print its result for the parent."""
    print(MARKER + json.dumps(result), flush=True)


def run_case(module: str, case: dict[str, Any], timeout: float = 600.0, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m <module> --case <json>`` in a fresh interpreter (``env`` added to the environment);
    return its result (or the error)."""
    cmd = [sys.executable, "-m", module, "--case", json.dumps(case)]
    env = {**os.environ, **(env or {})}
    env.setdefault("PYTHONHASHSEED", "0")
    load = load_average()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"case": case, "error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            out = json.loads(line[len(MARKER):])
            out.setdefault("case", case)
            out["subprocess_wall_s"] = round(wall, 2)
            out["load_at_start"] = load
            return out
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"case": case, "error": f"exit {proc.returncode}: " + " | ".join(tail), "subprocess_wall_s": round(wall, 2),
            "load_at_start": load}


def run_cases(module: str, cases: Sequence[dict[str, Any]], label: Callable[[dict[str, Any]], str],
              timeout: float = 600.0) -> list[dict[str, Any]]:
    """Each case in its own subprocess, one after another (never in parallel: they would share the CPU)."""
    out = []
    for i, case in enumerate(cases, 1):
        res = run_case(module, case, timeout=timeout)
        status = res.get("error") or res.get("summary", "")
        print(f"  [{i}/{len(cases)}] {label(case)}: {status} ({res.get('subprocess_wall_s', '?')} s)", flush=True)
        out.append(res)
    return out


def case_main(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Entry point of a benchmark module run as ``--case JSON``."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True)
    args = ap.parse_args()
    emit(fn(json.loads(args.case)))


def max_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


# -- README ------------------------------------------------------------------

def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return lines


def _machine_line(payload: dict[str, Any]) -> str:
    m = payload.get("machine") or {}
    la_b, la_a = payload.get("load_before"), payload.get("load_after")
    return (
        f"_Run {payload.get('date', '?')} ({'quick' if payload.get('quick') else 'full'} mode) on "
        f"{m.get('processor', '?')}, {m.get('cpu_count', '?')} CPUs, torch {m.get('torch', '?')} "
        f"({m.get('torch_threads', '?')} threads), CUDA: {m.get('cuda') or 'none'}; "
        + "".join(f"{b['library']} {b['version']} ({b['architecture']} kernels); " for b in m.get("blas") or [])
        + f"load average before {la_b}, after {la_a}. Command: `{payload.get('command', 'python -m benchmarks')}`._"
    )


def render_readme(results_dir: Path = RESULTS_DIR) -> str:
    """The benchmarks README: one section per JSON file in ``results_dir`` (unknown ones shown generically)."""
    from . import end_to_end, engine_overhead, grid_profile, memory, throughput

    renderers: dict[str, Callable[[dict[str, Any]], list[str]]] = {
        "throughput_kd": throughput.render_kd,  # before "throughput": the first prefix match wins
        "throughput": throughput.render,
        "memory": memory.render,
        "end_to_end": end_to_end.render,
        "retrieval": render_retrieval,
        "grid_profile": grid_profile.render,
        "engine_overhead": engine_overhead.render,
    }
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m benchmarks` (`make bench`) from the JSON files in `benchmarks/results/`;",
        "do not edit by hand. `python -m benchmarks --quick` runs a smaller matrix, `--only NAME` one",
        "benchmark, `--full` adds the full Fashion-MNIST pipeline to `end_to_end`, `--label L` writes",
        "`NAME_L.json` (e.g. `engine_overhead_before` / `_after`), `--note TEXT` records what else ran. Every case runs in its",
        "own subprocess. Absolute times depend on the machine and on whatever else runs on it (the load",
        "average is recorded); ratios measured in the same run are the numbers to compare.",
        "",
    ]
    for path in sorted(results_dir.glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            lines += [f"## {path.stem}", "", f"(unreadable: {e})", ""]
            continue
        name = path.stem
        lines += [f"## {name}", ""]
        if isinstance(payload, dict) and "load_before" in payload:  # written by this runner
            lines += [_machine_line(payload), ""]
            if payload.get("note"):
                lines += [f"_Note: {payload['note']}_", ""]
        render = next((f for k, f in renderers.items() if name == k or name.startswith(k + "_")), render_generic)
        if name in STALE_BEFORE_REBUILD and isinstance(payload, dict) and payload.get("harness") != HARNESS:
            lines += [f"_Measured by the previous harness, on the pipeline before its rebuild (separate warmup and KD stages,"
                      f" private `Engine._epoch`); stage names differ from today's. Refresh with"
                      f" `python -m benchmarks --quick --only {name}` on an idle machine._", ""]
        try:
            lines += render(payload)
        except Exception as e:  # a result file of another shape must not break the README
            lines += [f"(could not render: {type(e).__name__}: {e})", ""] + render_generic(payload)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _flat(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            out += _flat(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(d, (int, float, str, bool)) or d is None:
        out.append((prefix, d))
    return out


def render_generic(payload: Any) -> list[str]:
    """Scalar leaves of an unknown result file, as a key/value table (lists are skipped)."""
    skip = ("machine", "load_before", "load_after", "date", "command", "quick")
    rows = [(k, v) for k, v in _flat(payload) if k.split(".")[0] not in skip]
    if not rows:
        return ["(no scalar results)"]
    return table(["key", "value"], rows[:80]) + ([f"({len(rows) - 80} more keys in the JSON)"] if len(rows) > 80 else [])


def render_retrieval(payload: Any) -> list[str]:
    """The retrieval benchmark is another module's; its keys are read defensively."""
    if not isinstance(payload, dict):
        return render_generic(payload)
    if "sizes" in payload:  # the current benchmarks/retrieval.py layout renders itself
        from .retrieval import render

        return render(payload)
    metrics = payload.get("metrics")
    if isinstance(metrics, dict) and metrics:
        data = payload.get("data") or {}
        lines = [f"Database {data.get('database', '?')} x queries {data.get('queries', '?')} x dim {data.get('dim', '?')};"
                 f" load average {(payload.get('machine') or {}).get('load_average_at_start')} -> {payload.get('load_average_at_end')}.", ""]
        body = []
        for metric, rec in metrics.items():
            rec = rec if isinstance(rec, dict) else {}
            ours = rec.get("ours_seconds")
            ours = ours.get("median") if isinstance(ours, dict) else ours
            gt = rec.get("ground_truth_check") if isinstance(rec.get("ground_truth_check"), dict) else {}
            body.append([metric, rec.get("authors_seconds_extrapolated"), ours, rec.get("speedup_vs_authors_median"),
                         gt.get("abs_diff")])
        lines += table(["metric", "authors' approach s (extrapolated)", "indistill s (median)", "speed-up",
                        "abs(mAP - float64)"], body)
        scale = payload.get("scale")
        if isinstance(scale, dict):
            lines += ["", *table(["scale case", "seconds", "peak RSS MiB"],
                                 [[f"{scale.get('database')} x {scale.get('queries')}", scale.get("seconds"),
                                   scale.get("peak_rss_mb_after")]])]
        return lines
    rows = payload.get("results") or payload.get("cases") or payload.get("rows")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        cols: list[str] = []
        for r in rows:
            for k, v in r.items():
                if k not in cols and (isinstance(v, (int, float, str, bool)) or v is None):
                    cols.append(k)
        return table(cols, [[r.get(c) for c in cols] for r in rows])
    return render_generic(payload)
