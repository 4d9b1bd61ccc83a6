"""The deployment view of a model: parameters, FLOPs, size on disk and measured CPU latency.

Every results table shows it per model, with the student/teacher ratios: distillation is for a model
that is smaller or faster, and a student that is neither is flagged. FLOPs are counted by PyTorch's
own ``torch.utils.flop_counter.FlopCounterMode`` (one forward of one input at the data's size; a
multiply-add is 2 FLOPs, and only the ops it knows are counted: convolutions, matmuls, attention).
Latency is wall time of ``model(x)`` under ``torch.inference_mode`` on the CPU, the median of
``repeats`` timed forwards after ``warmup`` untimed ones, per batch size, with the thread count stated:
numbers from another machine or another thread count are not comparable.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["count_flops", "deployment_ratios", "deployment_stats", "deployment_table", "measure_latency"]

BATCH_SIZES = (1, 64)


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward of ONE input of ``input_shape`` (C, H, W), by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    try:
        p = next(model.parameters(), None)
        x = torch.zeros(1, *input_shape, device=p.device if p is not None else "cpu")
        counter = FlopCounterMode(display=False)
        with counter:
            model(x)
    finally:
        model.train(was)
    return int(counter.get_total_flops())


def _cpu_copy(model: nn.Module) -> nn.Module:
    p = next(model.parameters(), None)
    return model if p is None or p.device.type == "cpu" else copy.deepcopy(model).cpu()


def measure_latency(model: nn.Module, input_shape: Sequence[int], batch_sizes: Sequence[int] = BATCH_SIZES,
                    repeats: int = 10, warmup: int = 2) -> dict[str, Any]:
    """Median CPU wall time (ms) of one forward per batch size, with the device and thread count it ran on."""
    m = _cpu_copy(model)
    was = m.training
    m.eval()
    out: dict[str, Any] = {"device": "cpu", "threads": torch.get_num_threads(), "repeats": int(repeats)}
    try:
        with torch.inference_mode():
            for b in batch_sizes:
                # a generator of its own: timing must not move the global random stream of a run
                x = torch.randn(int(b), *input_shape, generator=torch.Generator().manual_seed(0))
                for _ in range(max(0, warmup)):
                    m(x)
                times = []
                for _ in range(max(1, repeats)):
                    t0 = time.perf_counter()
                    m(x)
                    times.append(time.perf_counter() - t0)
                out[f"batch{b}_ms"] = 1000 * statistics.median(times)
    finally:
        m.train(was)
    return out


def deployment_stats(model: nn.Module, input_shape: Sequence[int], checkpoint: str | Path | None = None,
                     repeats: int = 10, batch_sizes: Sequence[int] = BATCH_SIZES) -> dict[str, Any]:
    """Parameters, FLOPs (batch 1), fp32 weight bytes, the checkpoint's size on disk and (``repeats`` > 0)
    CPU latency, for inputs of ``input_shape`` (C, H, W)."""
    stats: dict[str, Any] = {
        "input_shape": list(input_shape),
        "params": sum(p.numel() for p in model.parameters()),
        "flops": count_flops(model, input_shape),
        "weights_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
    }
    if checkpoint is not None and Path(checkpoint).is_file():
        stats["checkpoint_bytes"] = os.path.getsize(checkpoint)
    if repeats > 0:
        stats["latency"] = measure_latency(model, input_shape, batch_sizes, repeats=repeats)
    return stats


_RATIO_KEYS = (("params", "params"), ("flops", "flops"), ("weights_bytes", "size"))


def deployment_ratios(models: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Student/teacher ratios of params, FLOPs, size and latency, and what to flag, per student.

    A ratio >= 1 means the student is not smaller (params, FLOPs, size) or not faster (latency at
    that batch size) than its teacher; ``flags`` names each such case. Empty without a teacher.
    """
    teacher = next((r.get("deployment") for r in models.values() if r.get("role") == "teacher"), None)
    if not teacher:
        return {}
    out: dict[str, Any] = {}
    for name, r in models.items():
        d = r.get("deployment")
        if r.get("role") != "student" or not d:
            continue
        ratios: dict[str, float] = {}
        for key, label in _RATIO_KEYS:
            if teacher.get(key):
                ratios[label] = d[key] / teacher[key]
        for k, v in (d.get("latency") or {}).items():
            if k.endswith("_ms") and (teacher.get("latency") or {}).get(k):
                ratios[f"latency_{k[:-3]}"] = v / teacher["latency"][k]
        flags = []
        if ratios.get("params", 0) >= 1 and ratios.get("size", 0) >= 1:
            flags.append("not smaller than its teacher")
        slow = [k[len("latency_"):] for k, v in ratios.items() if k.startswith("latency_") and v >= 1]
        if slow:
            flags.append(f"not faster than its teacher at {', '.join(s.replace('batch', 'batch ') for s in slow)}")
        out[name] = {"ratios": ratios, "flags": flags}
    return out


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def _ms(d: Mapping[str, Any], b: int) -> str:
    v = (d.get("latency") or {}).get(f"batch{b}_ms")
    return "-" if v is None or not math.isfinite(v) else f"{v:.2f}"


def deployment_table(models: Mapping[str, Mapping[str, Any]], ratios: Mapping[str, Any] | None = None) -> str:
    """Markdown: per model params, GFLOPs, MB, CPU latency at batch 1 and 64, and the student/teacher ratios."""
    rows = {n: r for n, r in models.items() if r.get("deployment")}
    if not rows:
        return ""
    ratios = deployment_ratios(models) if ratios is None else ratios
    lat = next((r["deployment"].get("latency") for r in rows.values() if r["deployment"].get("latency")), None)
    shape = next(iter(rows.values()))["deployment"].get("input_shape")
    head = ("| model | role | params | GFLOPs | weights MB | file MB | CPU ms, batch 1 | CPU ms, batch 64 | "
            "vs teacher: params / FLOPs / batch 1 / batch 64 | flag |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in rows.items():
        d = r["deployment"]
        q = ratios.get(name, {})
        rr = q.get("ratios", {})
        vs = " / ".join("-" if rr.get(k) is None else f"{rr[k]:.2f}x"
                        for k in ("params", "flops", "latency_batch1", "latency_batch64")) if rr else ""
        lines.append(f"| {name} | {r.get('role', '')} | {d['params'] / 1e6:.3f}M | {d['flops'] / 1e9:.4f} | "
                     f"{_mb(d.get('weights_bytes'))} | {_mb(d.get('checkpoint_bytes'))} | {_ms(d, 1)} | {_ms(d, 64)} | "
                     f"{vs} | {'; '.join(q.get('flags', [])) or ''} |")
    notes = [f"FLOPs of one {'x'.join(str(v) for v in shape or [])} input (torch.utils.flop_counter; a multiply-add "
             "is 2 FLOPs); weights MB: the fp32 state dict; file MB: the checkpoint as saved (training state included)."]
    if lat:
        notes.append(f"Latency: median of {lat.get('repeats')} forwards on the {lat.get('device')} with "
                     f"{lat.get('threads')} threads, after 2 untimed ones (this machine only: compare within one table).")
    return "\n".join(lines) + "\n\n" + " ".join(notes)
