"""Retrieval-metric speed: the authors' evaluation approach vs ``indistill.evaluate``.

    python benchmarks/retrieval.py [--quick]

Data: clustered random features (10 classes, 128-d, float32), 60k database x
10k queries (``--quick``: 6k x 1k). For each metric (cosine, euclidean):

(a) the authors' approach, re-implemented here: sklearn
    ``NearestNeighbors(algorithm="brute", n_neighbors=len(db))`` full ranking
    of each batch of 128 queries, then their numpy metric passes (cumsum
    precision, monotone pass, argmin recall matching at 11 + 21 levels). It
    is run on the first ``AUTHORS_BATCHES`` batches only and extrapolated
    linearly to all queries (its cost is the same for every batch);
(b) ``retrieval_metrics`` on all queries, repeated, median/min/max.

Exactness: the per-query APs of (b) are checked against a float64 ground truth
(numpy keys, stable argsort, explicit AP) on a query subset: the mAP of (b)
restricted to that subset must equal the ground truth to 1e-12 (summation
order only). A 1M x 200 case (ours only) shows memory stays bounded by chunking.
Writes ``benchmarks/results/retrieval.json`` (``--quick``: ``retrieval_quick.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from indistill.evaluate import retrieval_metrics

AUTHORS_BATCHES = 2
GROUND_TRUTH_QUERIES = 200


def make_data(n_db: int, n_q: int, dim: int = 128, classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)) * 0.35
    dbl = rng.integers(0, classes, n_db)
    ql = rng.integers(0, classes, n_q)
    db = (centers[dbl] + rng.normal(size=(n_db, dim)) * 1.0).astype(np.float32)
    q = (centers[ql] + rng.normal(size=(n_q, dim)) * 1.0).astype(np.float32)
    return db, dbl, q, ql


def authors_approach(db, dbl, q, ql, metric: str, batches: int) -> tuple[float, float]:
    """Seconds for ``batches`` batches of 128 queries, and their mAP, the authors' way."""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=len(db), algorithm="brute", metric=metric).fit(db)
    counts = np.bincount(dbl)
    levels, fine = np.arange(0, 1.01, 0.1), np.arange(0, 1.01, 0.05)
    t0 = time.perf_counter()
    maps = []
    for i in range(batches):
        qb, tb = q[i * 128 : (i + 1) * 128], ql[i * 128 : (i + 1) * 128]
        _, idx = nn.kneighbors(qb)
        rel = (dbl[idx] == tb[:, None]).astype(np.int64)
        prec = np.cumsum(rel, axis=1) / np.arange(1, len(db) + 1, dtype=np.float64)
        for col in range(len(prec) - 2, -1, -1):
            prec[:, col] = np.maximum(prec[:, col], prec[:, col + 1])
        recall = np.cumsum(rel, axis=1) / counts[tb][:, None].astype(np.float64)
        at = np.stack([prec[np.arange(len(tb)), np.argmin(np.abs(recall - lv), axis=1)] for lv in levels], 1)
        _ = np.stack([prec[np.arange(len(tb)), np.argmin(np.abs(recall - lv), axis=1)] for lv in fine], 1)
        _ = prec.mean(0)
        maps.append(at.mean(1))
    return time.perf_counter() - t0, float(np.concatenate(maps).mean())


def ground_truth_map(db, dbl, q, ql, metric: str) -> float:
    """float64 keys with numpy, stable full argsort per query, explicit AP."""
    d64, q64 = db.astype(np.float64), q.astype(np.float64)
    if metric == "cosine":
        norm = np.sqrt((d64 * d64).sum(1))
        keys = (q64 @ d64.T) / np.where(norm > 0, norm, 1.0)
    else:
        keys = -(((q64 * q64).sum(1)[:, None] + (d64 * d64).sum(1)[None, :]) - 2 * q64 @ d64.T)
    aps = []
    for i in range(len(q)):
        rel = dbl[np.argsort(-keys[i], kind="stable")] == ql[i]
        pos = np.flatnonzero(rel) + 1
        aps.append(np.mean(np.arange(1, len(pos) + 1) / pos))
    return float(np.mean(aps))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(quick: bool = False, threads: int | None = None) -> dict:
    """Run the benchmark; returns the result dict (also written as JSON).

    ``threads`` sets torch's intra-op threads (default: torch's own choice). On a
    shared, oversubscribed machine 1 thread is several times faster than 2
    (OpenMP barriers stall when a thread is descheduled).
    """
    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    n_db, n_q, repeats = (6000, 1000, 3) if quick else (60000, 10000, 2)
    db, dbl, q, ql = make_data(n_db, n_q)
    tdb, tdbl, tq, tql = map(torch.from_numpy, (db, dbl, q, ql))
    out: dict = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0],
            "load_average_at_start": os.getloadavg(),
        },
        "data": {"database": n_db, "queries": n_q, "dim": 128, "classes": 10},
        "authors_batches_timed": AUTHORS_BATCHES,
        "metrics": {},
    }
    for metric in ("cosine", "euclidean"):
        rec: dict = {}
        t_sub, map_sub_authors = authors_approach(db, dbl, q, ql, metric, AUTHORS_BATCHES)
        rec["authors_seconds_extrapolated"] = t_sub * n_q / (128 * AUTHORS_BATCHES)
        rec["authors_seconds_measured"] = t_sub
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = retrieval_metrics(tdb, tdbl, tq, tql, metric=metric, protocol="reference")
            times.append(time.perf_counter() - t0)
        rec["ours_seconds"] = {"median": statistics.median(times), "min": min(times), "max": max(times),
                               "runs": times}
        rec["speedup_vs_authors_median"] = rec["authors_seconds_extrapolated"] / statistics.median(times)
        rec["result"] = {k: v for k, v in res.items() if k != "pr_curve"}
        # The authors' mAP on the timed batches vs ours (reference protocol) on the same queries:
        sub = AUTHORS_BATCHES * 128
        ours_sub = retrieval_metrics(tdb, tdbl, tq[:sub], tql[:sub], metric=metric, protocol="reference")
        rec["reference_map11_on_timed_queries"] = {"authors_code": map_sub_authors, "ours": ours_sub["map11"]}
        gt_n = min(GROUND_TRUTH_QUERIES, n_q)
        gt = ground_truth_map(db, dbl, q[:gt_n], ql[:gt_n], metric)
        mine = retrieval_metrics(tdb, tdbl, tq[:gt_n], tql[:gt_n], metric=metric)["map"]
        rec["ground_truth_check"] = {"queries": gt_n, "float64_map": gt, "ours_map": mine,
                                     "abs_diff": abs(gt - mine)}
        assert abs(gt - mine) <= 1e-12, f"{metric}: mAP {mine} != float64 ground truth {gt}"
        out["metrics"][metric] = rec
        print(f"{metric}: authors ~{rec['authors_seconds_extrapolated']:.1f}s, ours median "
              f"{rec['ours_seconds']['median']:.2f}s, speedup {rec['speedup_vs_authors_median']:.1f}x, "
              f"|mAP - float64| = {abs(gt - mine):.1e}", flush=True)
    out["peak_rss_mb_after_main"] = peak_rss_mb()

    # Scale: 1M x 1k (quick: 100k x 200), ours only, default chunking.
    n_big, q_big = (100_000, 200) if quick else (1_000_000, 200)
    bdb, bdbl, bq, bql = make_data(n_big, q_big, seed=1)
    bdb_t, bdbl_t, bq_t, bql_t = map(torch.from_numpy, (bdb, bdbl, bq, bql))
    del bdb, bq
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    big = retrieval_metrics(bdb_t, bdbl_t, bq_t, bql_t, metric="cosine")
    out["scale"] = {
        "database": n_big, "queries": q_big, "seconds": time.perf_counter() - t0,
        "peak_rss_mb_before": rss_before, "peak_rss_mb_after": peak_rss_mb(),
        "input_mb": bdb_t.numel() * 4 / 2**20, "map": big["map"],
        "note": "peak RSS includes the float64 label-sorted copy of the database (2x the float32 input) "
                "plus one chunk of ~2M float64 scores",
    }
    print(f"scale {n_big} x {q_big}: {out['scale']['seconds']:.1f}s, peak RSS {out['scale']['peak_rss_mb_after']:.0f} MB",
          flush=True)
    out["load_average_at_end"] = os.getloadavg()
    path = Path(__file__).parent / "results" / ("retrieval_quick.json" if quick else "retrieval.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, seconds instead of minutes")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    run(args.quick, args.threads)
