"""Peak memory of each training stage and of retrieval evaluation, one subprocess per case.

Stages are those of :mod:`benchmarks.throughput` (built with the public stage builders and
``Pipeline.arm``, run through ``Engine.begin`` + ``Engine.run_epoch``).
Peak RSS is ``getrusage(RUSAGE_SELF).ru_maxrss`` of the case's own interpreter; a ``baseline``
case (imports, data loaded, models built, no training) is measured the same way so the stage's
own cost is ``peak - baseline``. On CUDA ``torch.cuda.max_memory_allocated`` is recorded too.
"""

from __future__ import annotations

import time
from typing import Any

from .common import case_main, max_rss_mb, run_cases, table
from .throughput import PAIRS, STAGES, stage_case

RETRIEVAL_SHAPE = (60000, 10000, 128)


def _cuda_peak() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def baseline_case(case: dict[str, Any]) -> dict[str, Any]:
    """Everything a stage case does before training: imports, data, both models."""
    import tempfile

    import torch

    from indistill.config import load_config
    from indistill.pipeline import Pipeline

    from .throughput import case_data

    data, _ = case_data(case)
    t, s = PAIRS[case["pair"]]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"out_dir={tmp}", "progress=false", "device=cpu", f"teacher.name={t}", f"student.name={s}"])
        pipe = Pipeline(cfg, data=data)
        pipe.seeded_model(cfg.teacher), pipe.seeded_model(cfg.student)
    torch.manual_seed(0)
    return {"max_rss_mb": max_rss_mb(), "cuda_max_allocated_mb": _cuda_peak()}


def retrieval_case(case: dict[str, Any]) -> dict[str, Any]:
    """``indistill.evaluate.retrieval_metrics`` on random features of the Fashion-MNIST retrieval size."""
    import torch

    try:
        from indistill.evaluate import retrieval_metrics
    except ImportError as e:
        return {"error": f"indistill.evaluate.retrieval_metrics unavailable ({e})"}
    n, q, d = case["shape"]
    g = torch.Generator().manual_seed(0)
    db, qs = torch.randn(n, d, generator=g), torch.randn(q, d, generator=g)
    db_y, q_y = torch.randint(0, 10, (n,), generator=g), torch.randint(0, 10, (q,), generator=g)
    before = max_rss_mb()
    t0 = time.perf_counter()
    res = retrieval_metrics(db, db_y, qs, q_y, metric=case.get("metric", "cosine"), protocol=case.get("protocol", "standard"))
    wall = time.perf_counter() - t0
    peak = max_rss_mb()
    m = res.get("map", res.get("mAP")) if isinstance(res, dict) else None
    return {"max_rss_mb": peak, "rss_before_mb": before, "delta_mb": peak - before, "wall_s": wall,
            "cuda_max_allocated_mb": _cuda_peak(), "map_random": m, "summary": f"peak {peak:.0f} MiB"}


def case_fn(case: dict[str, Any]) -> dict[str, Any]:
    if case["kind"] == "baseline":
        out = baseline_case(case)
    elif case["kind"] == "retrieval":
        return retrieval_case(case)
    else:
        # stage_case builds the stage with the public builders and runs it through Engine.run_epoch
        # (warm-up plus timed batches); the peak covers both.
        out = stage_case(case)
        out = {k: out[k] for k in ("error", "phase", "data_source") if k in out}
        out["cuda_max_allocated_mb"] = _cuda_peak()
        out["max_rss_mb"] = max_rss_mb()
    out["summary"] = f"peak {out['max_rss_mb']:.0f} MiB" if "max_rss_mb" in out else ""
    return out


def cases(quick: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for pair in PAIRS:
        out.append({"kind": "baseline", "pair": pair})
        for stage in STAGES:
            if quick and pair == "resnet" and stage not in ("supervised", "warmup_mse", "kd:pkt", "kd:crd"):
                continue  # ~4 s per ResNet batch on 2 cores
            out.append({"kind": "stage", "pair": pair, "stage": stage, "variant": "fp32", "data": "memory",
                        "batch_size": 128, "warm": 1, "batches": 1, "repeats": 1, "budget_s": 0})
    for metric in ("cosine", "euclidean"):
        out.append({"kind": "retrieval", "shape": list(RETRIEVAL_SHAPE), "metric": metric, "protocol": "standard"})
        if quick:
            break
    return out


def _label(c: dict[str, Any]) -> str:
    if c["kind"] == "retrieval":
        return f"retrieval {c['metric']} {c['shape']}"
    return f"{c['pair']} {c.get('stage', 'baseline')}"


def run(quick: bool) -> dict[str, Any]:
    rows = run_cases("benchmarks.memory", cases(quick), _label, timeout=900)
    base = {r["case"]["pair"]: r.get("max_rss_mb") for r in rows if r["case"]["kind"] == "baseline"}
    for r in rows:
        b = base.get(r["case"].get("pair"))
        if r["case"]["kind"] == "stage" and b and "max_rss_mb" in r:
            r["over_baseline_mb"] = r["max_rss_mb"] - b
    return {"cases": rows, "batch_size": 128}


def render(payload: dict[str, Any]) -> list[str]:
    rows = payload.get("cases", [])
    lines = ["Peak RSS (MiB) of one subprocess per case: fp32, batch 128, one warm-up and one timed batch;",
             "`baseline` = imports + Fashion-MNIST in memory + both models, no training.", ""]
    body = []
    for r in rows:
        c = r.get("case", {})
        if c.get("kind") == "retrieval":
            continue
        body.append([c.get("pair"), c.get("stage", "baseline"), r.get("max_rss_mb"), r.get("over_baseline_mb"),
                     r.get("cuda_max_allocated_mb"), r.get("error")])
    lines += table(["pair", "stage", "peak RSS MiB", "over baseline MiB", "CUDA max alloc MiB", "error"], body) + [""]
    ret = [r for r in rows if r.get("case", {}).get("kind") == "retrieval"]
    if ret:
        lines += ["Retrieval evaluation (`indistill.evaluate.retrieval_metrics`, random features):", ""]
        lines += table(["database x queries x dim", "metric", "peak RSS MiB", "growth MiB", "wall s", "error"],
                       [["x".join(map(str, r["case"]["shape"])), r["case"]["metric"], r.get("max_rss_mb"),
                         r.get("delta_mb"), r.get("wall_s"), r.get("error")] for r in ret])
    return lines


if __name__ == "__main__":
    case_main(case_fn)
