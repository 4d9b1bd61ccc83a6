"""Retrieval-metric speed: the authors' evaluation approach vs ``indistill.evaluate``, both in full.

    python -m benchmarks --only retrieval [--quick]      (or python -m benchmarks.retrieval [--quick])

Data: clustered random features (10 classes, 128-d, float32, overlapping
clusters). Sizes: 30k database x 3k queries and 60k x 10k (``--quick``: 6k x 1k).
For each size and metric (cosine, euclidean), in one process and interleaved
(ours, theirs, ours, ...) so that the machine's load hits both alike:

(a) the authors' approach, re-implemented here and run on ALL queries: sklearn
    ``NearestNeighbors(algorithm="brute", n_neighbors=len(db))`` full ranking of
    each batch of 128 queries, then their numpy passes (cumsum precision,
    monotone pass, argmin recall matching at 11 + 21 levels, top-k precision);
(b) ``retrieval_metrics(..., protocol="reference")`` (the default fast path).

Speed-up = median(a) / median(b). Exactness: every metric of (b) (standard and
reference protocol: map, map11, p@k, every PR-curve point) is compared with the
float64 grid path (``exact=True``); the mAP is also checked against an
independent float64 ground truth (numpy keys, stable argsort) on 200 queries.
Real embeddings: a random cnn32_small's embedding tap on Fashion-MNIST, default path
vs ``exact=True`` on every metric. ImageNet scale (1.28M x 50k x 512-d, 1000 classes) is projected from measured
rounds of default-size chunks run side by side, as the library runs them. Writes ``benchmarks/results/retrieval.json``
(``--quick``: ``retrieval_quick.json``) with the machine and ``os.getloadavg()``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from indistill.evaluate import retrieval_metrics, retrieval_metrics_multi

GROUND_TRUTH_QUERIES = 200
# (database, queries, authors' runs): ours runs one more time than theirs, interleaved around them
SIZES = [(30000, 3000, 3), (60000, 10000, 1)]
QUICK_SIZES = [(6000, 1000, 2)]
KS = (1, 10, 100)


def make_data(n_db: int, n_q: int, dim: int = 128, classes: int = 10, seed: int = 0, spread: float = 0.35):
    """Overlapping Gaussian clusters, float32; labels in random order."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)) * spread
    dbl = rng.integers(0, classes, n_db)
    ql = rng.integers(0, classes, n_q)
    db = (centers[dbl] + rng.normal(size=(n_db, dim))).astype(np.float32)
    q = (centers[ql] + rng.normal(size=(n_q, dim))).astype(np.float32)
    return db, dbl, q, ql


def authors_approach(db, dbl, q, ql, metric: str) -> tuple[float, dict[str, float]]:
    """Seconds for all queries the authors' way (index fit included), and their metrics."""
    from sklearn.neighbors import NearestNeighbors

    t0 = time.perf_counter()
    nn = NearestNeighbors(n_neighbors=len(db), algorithm="brute", metric=metric).fit(db)
    counts = np.bincount(dbl)
    levels, fine = np.arange(0, 1.01, 0.1), np.arange(0, 1.01, 0.05)
    maps, curves, topk = [], [], []
    for i in range(0, len(q), 128):
        qb, tb = q[i : i + 128], ql[i : i + 128]
        _, idx = nn.kneighbors(qb)
        rel = (dbl[idx] == tb[:, None]).astype(np.int64)
        prec = np.cumsum(rel, axis=1) / np.arange(1, len(db) + 1, dtype=np.float64)
        for col in range(len(prec) - 2, -1, -1):  # their loop bound: rows of the batch
            prec[:, col] = np.maximum(prec[:, col], prec[:, col + 1])
        recall = np.cumsum(rel, axis=1) / counts[tb][:, None].astype(np.float64)
        rows = np.arange(len(tb))
        maps.append(np.stack([prec[rows, np.argmin(np.abs(recall - lv), axis=1)] for lv in levels], 1).mean(1))
        curves.append(np.stack([prec[rows, np.argmin(np.abs(recall - lv), axis=1)] for lv in fine], 1))
        topk.append(prec[:, [k - 1 for k in KS]])
    seconds = time.perf_counter() - t0
    out = {"map11": float(np.concatenate(maps).mean())}
    out.update({f"p@{k}": float(v) for k, v in zip(KS, np.concatenate(topk).mean(0))})
    out["pr_curve_mean"] = float(np.concatenate(curves).mean())
    return seconds, out


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


def max_metric_diff(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> tuple[float, str]:
    """Largest |a - b| over every scalar metric and PR-curve point of every protocol, and where."""
    worst, where = 0.0, ""
    for protocol, ra in a.items():
        rb = b[protocol]
        pairs = [(k, ra[k], rb[k]) for k in ra if isinstance(ra[k], float)]
        pairs += [(f"pr[{i}]", x, y) for i, (x, y) in
                  enumerate(zip(ra["pr_curve"]["precision"], rb["pr_curve"]["precision"]))]
        for k, x, y in pairs:
            if abs(x - y) >= worst:
                worst, where = abs(x - y), f"{protocol}/{k}"
    return worst, where


# Environment variables that change what is measured: kept in the result's command line.
_ENV = ("OMP_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def _command() -> str:
    """The command line that produced this result (with the variables of ``_ENV`` that are set)."""
    env = "".join(f"{k}={os.environ[k]} " for k in _ENV if k in os.environ)
    module = "benchmarks" if sys.argv[0].endswith("__main__.py") and "benchmarks" in sys.argv[0] else "benchmarks.retrieval"
    return f"{env}python -m {module} {' '.join(sys.argv[1:])}".rstrip()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _ours(t, metric: str) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    res = retrieval_metrics(*t, metric=metric, ks=KS, protocol="reference")
    return time.perf_counter() - t0, res


def bench_size(n_db: int, n_q: int, authors_runs: int) -> dict[str, Any]:
    """Interleaved ours/theirs timing for both metrics at one size, plus the exactness checks."""
    db, dbl, q, ql = make_data(n_db, n_q)
    t = tuple(map(torch.from_numpy, (db, dbl, q, ql)))
    out: dict[str, Any] = {"database": n_db, "queries": n_q, "dim": db.shape[1], "classes": 10, "metrics": {}}
    for metric in ("cosine", "euclidean"):
        ours, theirs, authors_metrics = [], [], {}
        sec, res = _ours(t, metric)
        ours.append(sec)
        for _ in range(authors_runs):  # ours, theirs, ours, theirs, ours ...
            sec_a, authors_metrics = authors_approach(db, dbl, q, ql, metric)
            theirs.append(sec_a)
            sec, res = _ours(t, metric)
            ours.append(sec)
            print(f"  {n_db}x{n_q} {metric}: authors {sec_a:.2f}s, ours {ours[-2]:.2f}s / {ours[-1]:.2f}s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
        # Per-round ratio: each authors' run against the mean of our runs on either side of it.
        rounds = [theirs[i] / ((ours[i] + ours[i + 1]) / 2) for i in range(len(theirs))]
        fast = retrieval_metrics_multi(*t, metric=metric, ks=KS)
        t0 = time.perf_counter()
        exact = retrieval_metrics_multi(*t, metric=metric, ks=KS, exact=True)
        exact_s = time.perf_counter() - t0
        diff, where = max_metric_diff(fast, exact)
        gt_n = min(GROUND_TRUTH_QUERIES, n_q)
        gt = ground_truth_map(db, dbl, q[:gt_n], ql[:gt_n], metric)
        mine = retrieval_metrics(t[0], t[1], t[2][:gt_n], t[3][:gt_n], metric=metric)["map"]
        rec = {
            "authors_seconds": {"median": statistics.median(theirs), "runs": theirs},
            "ours_seconds": {"median": statistics.median(ours), "min": min(ours), "max": max(ours), "runs": ours},
            "speedup_median": statistics.median(theirs) / statistics.median(ours),
            "speedup_per_round": rounds,
            "exact_path_seconds": exact_s,
            "max_abs_diff_vs_exact": diff,
            "max_abs_diff_at": where,
            "ground_truth_check": {"queries": gt_n, "float64_map": gt, "ours_map": mine, "abs_diff": abs(gt - mine)},
            "result": {k: v for k, v in res.items() if k != "pr_curve"},
            "authors_result": authors_metrics,
        }
        assert diff <= 1e-6, f"{metric}: fast path differs from the float64 path by {diff} at {where}"
        assert abs(gt - mine) <= 1e-12, f"{metric}: mAP {mine} != float64 ground truth {gt}"
        out["metrics"][metric] = rec
        print(f"  {n_db}x{n_q} {metric}: speed-up {rec['speedup_median']:.1f}x (per round "
              f"{', '.join(f'{r:.1f}' for r in rounds)}), max |fast - exact| = {diff:.1e} ({where}), "
              f"exact path {exact_s:.1f}s", flush=True)
    return out


def imagenet_projection(quick: bool, rounds: int = 3) -> dict[str, Any]:
    """Project a 1.28M x 50k x 512-d evaluation (1000 classes, 50 queries each, cosine) from measured chunks.

    Times the one-off setup (the float64 label-sorted database and norms) and the
    default path's chunk work as ``retrieval_metrics_multi`` runs it (``ChunkScorer``): chunks of the
    default size from different classes, as many side by side as it runs (one per thread),
    each ranked and scored under both protocols.
    ``rounds`` rounds of one chunk per thread; per query = median round / queries per round.
    """
    from indistill.evaluate import ChunkScorer, default_chunk_rows

    n_db, dim, classes, per_class = (128_000, 512, 100, 50) if quick else (1_281_167, 512, 1000, 50)
    rng = np.random.default_rng(1)
    labels = np.sort(rng.integers(0, classes, n_db))  # grouped labels: no label-sorted copy is made
    db = torch.empty(n_db, dim)
    centers = rng.normal(size=(classes, dim)).astype(np.float32) * 0.35
    for i in range(0, n_db, 65536):  # generated in blocks to keep the float64 temporaries small
        block = rng.standard_normal((min(65536, n_db - i), dim), dtype=np.float32)
        db[i : i + len(block)] = torch.from_numpy(block + centers[labels[i : i + len(block)]])
    rss0 = peak_rss_mb()
    chunk = min(default_chunk_rows(n_db), per_class)
    t0 = time.perf_counter()
    scorer = ChunkScorer(db, "cosine", KS, chunk)
    setup = time.perf_counter() - t0
    bounds = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=classes))])
    workers = scorer.workers

    times = []
    for r in range(rounds):
        items = [(torch.from_numpy(centers[c] + rng.standard_normal((chunk, dim), dtype=np.float32)).double(),
                  int(bounds[c]), int(bounds[c + 1])) for c in range(r * workers, (r + 1) * workers)]
        t0 = time.perf_counter()
        scorer.run(items)
        times.append(time.perf_counter() - t0)
        print(f"  ImageNet-scale round {r}: {workers} chunk(s) of {chunk} queries x {n_db} x {dim}: "
              f"{times[-1]:.2f}s", flush=True)
    per_query = statistics.median(times) / (chunk * workers)
    total_q = classes * per_class
    return {
        "database": n_db, "dim": dim, "classes": classes, "queries_projected": total_q,
        "chunk_queries": chunk, "workers": workers, "round_seconds": times, "setup_seconds": setup,
        "seconds_per_query": per_query, "projected_seconds": setup + per_query * total_q,
        "peak_rss_mb_before": rss0, "peak_rss_mb_after": peak_rss_mb(),
        "load_average": list(os.getloadavg()),
        "note": "cosine, default chunk size, chunks side by side as retrieval_metrics_multi runs them; "
                "projected = setup + median round / queries per round x all queries",
    }


def real_embeddings_check(quick: bool) -> dict[str, Any]:
    """Default path vs float64 grid path on real embeddings: a randomly initialised cnn32_small's
    embedding tap on Fashion-MNIST (database = train split, queries = test split)."""
    from indistill.data import get_dataset
    from indistill.evaluate import extract_features
    from indistill.models.registry import create_model, model_taps

    from .common import FASHION_MNIST_DIR

    kw = {"train_subset": 6000, "test_subset": 1000} if quick else {}
    data = get_dataset("fashion_mnist", root=str(FASHION_MNIST_DIR), **kw)
    torch.manual_seed(0)
    probe = next(iter(data.test.batches(2)))
    model = create_model("cnn32_small", num_classes=10, in_channels=probe.images.shape[1])
    taps = model_taps(model)
    db = extract_features(model, taps, data.train_eval)
    q = extract_features(model, taps, data.test)
    out: dict[str, Any] = {"features": "cnn32_small (random init) embedding tap, Fashion-MNIST",
                           "database": len(db["labels"]), "queries": len(q["labels"]),
                           "dim": db["embedding"].shape[1], "metrics": {}}
    for metric in ("cosine", "euclidean"):
        args = (db["embedding"], db["labels"], q["embedding"], q["labels"])
        t0 = time.perf_counter()
        fast = retrieval_metrics_multi(*args, metric=metric, ks=KS)
        t1 = time.perf_counter()
        exact = retrieval_metrics_multi(*args, metric=metric, ks=KS, exact=True)
        t2 = time.perf_counter()
        diff, where = max_metric_diff(fast, exact)
        out["metrics"][metric] = {"max_abs_diff_vs_exact": diff, "max_abs_diff_at": where, "fast_seconds": t1 - t0,
                                  "exact_seconds": t2 - t1, "reference_map11": fast["reference"]["map11"]}
        assert diff <= 1e-6, f"{metric}: fast path differs from the float64 path by {diff} at {where}"
        print(f"  real embeddings ({out['database']} x {out['queries']} x {out['dim']}) {metric}: "
              f"max |fast - exact| = {diff:.1e}, fast {t1 - t0:.1f}s, exact {t2 - t1:.1f}s", flush=True)
    return out


def result_path(quick: bool) -> Path:
    """results/retrieval[_quick].json; with OPENBLAS_CORETYPE set, a file of its own (``_openblas_<type>``):
    a run on kernels pinned by the environment never replaces the one on the kernels OpenBLAS picks itself."""
    core = os.environ.get("OPENBLAS_CORETYPE", "").strip().lower()
    name = "retrieval" + (f"_openblas_{core}" if core else "") + ("_quick" if quick else "")
    return Path(__file__).parent / "results" / f"{name}.json"


def run(quick: bool = False, threads: int | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the result dict (also written as JSON)."""
    from .common import blas_info, load_average, machine_info

    if threads:
        torch.set_num_threads(threads)
    if os.environ.get("OPENBLAS_CORETYPE"):
        print(f"  note: OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} pins numpy's BLAS kernels "
              f"({', '.join(str(b['architecture']) for b in blas_info())}); this run writes "
              f"{result_path(quick).name}. Unset it (with OPENBLAS_L2_SIZE) to time the kernels OpenBLAS "
              f"picks for this CPU.", flush=True)
    load_start = load_average()
    t_start = time.perf_counter()
    sizes = QUICK_SIZES if quick else SIZES
    out: dict[str, Any] = {
        "benchmark": "retrieval", "quick": quick, "machine": machine_info(),
        "load_before": load_start, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": _command(),
        "sizes": [],
    }
    for n_db, n_q, runs in sizes:
        out["sizes"].append(bench_size(n_db, n_q, runs))
    out["real_embeddings"] = real_embeddings_check(quick)
    out["imagenet_projection"] = imagenet_projection(quick)
    p = out["imagenet_projection"]
    print(f"  ImageNet projection: {p['projected_seconds'] / 60:.1f} min "
          f"({p['seconds_per_query'] * 1e3:.1f} ms/query), peak RSS {p['peak_rss_mb_after']:.0f} MB", flush=True)
    out["load_after"] = load_average()
    out["wall_s"] = time.perf_counter() - t_start
    path = result_path(quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return out


def render(payload: dict[str, Any]) -> list[str]:
    """README section for a result file written by :func:`run`."""
    from .common import table

    rows = []
    for size in payload.get("sizes", []):
        for metric, rec in size["metrics"].items():
            rows.append([f"{size['database']} x {size['queries']}", metric, rec["authors_seconds"]["median"],
                         rec["ours_seconds"]["median"], rec["speedup_median"],
                         " / ".join(f"{r:.1f}" for r in rec["speedup_per_round"]), rec["max_abs_diff_vs_exact"],
                         rec["ground_truth_check"]["abs_diff"]])
    lines = [
        "Both approaches on all queries, in one process, interleaved (ours, theirs, ours, ...); the authors'",
        "approach is sklearn brute-force kNN with a full ranking plus their numpy passes. `diff vs exact`: the",
        "largest difference over every metric (map, map11, p@k, PR points; both protocols) between the default",
        "path and the float64 grid path (`exact=True`). The BLAS kernels in the machine line matter: the float64",
        "matmul is, with the sort, most of our time. `retrieval.json` is timed on the kernels numpy's OpenBLAS picks;",
        "an environment that pins them (`OPENBLAS_CORETYPE`, set on the benchmark machine) gets",
        "`retrieval_openblas_<type>.json` (`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m benchmarks",
        "--only retrieval` runs without the pin).",
        "",
        *table(["database x queries", "metric", "authors' s (median)", "indistill s (median)", "speed-up",
                "per round", "diff vs exact", "abs(mAP - float64 argsort)"], rows),
    ]
    real = payload.get("real_embeddings")
    if isinstance(real, dict):
        lines += ["", *table(["real embeddings", "metric", "diff vs exact", "default s", "exact=True s"],
                             [[f"{real['features']}: {real['database']} x {real['queries']} x {real['dim']}", m,
                               r["max_abs_diff_vs_exact"], r["fast_seconds"], r["exact_seconds"]]
                              for m, r in real["metrics"].items()])]
    p = payload.get("imagenet_projection")
    if isinstance(p, dict):
        lines += ["", *table(["ImageNet-scale projection (CPU, cosine)", "setup s", "round s (median)",
                              "queries / round", "ms / query", "projected min", "peak RSS MiB"],
                             [[f"{p['database']} x {p['queries_projected']} x {p['dim']}", p["setup_seconds"],
                               statistics.median(p["round_seconds"]), p["chunk_queries"] * p["workers"],
                               p["seconds_per_query"] * 1e3, p["projected_seconds"] / 60, p["peak_rss_mb_after"]]])]
    reruns = [f"{part} measured {payload[part]['rerun']['date']} (load {payload[part]['rerun']['load_before']}, "
              f"{payload[part]['rerun'].get('torch_threads', '?')} threads)"
              for part in ("real_embeddings", "imagenet_projection")
              if isinstance(payload.get(part), dict) and "rerun" in payload[part]]
    if reruns:
        lines += ["", "_" + "; ".join(reruns) + ", apart from the timed sizes above "
                  "(`python -m benchmarks.retrieval --update PART`)._"]
    return lines


def update(parts: list[str], quick: bool) -> dict[str, Any]:
    """Re-run only some parts (``sizes``, ``real_embeddings``, ``imagenet_projection``) into the existing JSON.

    ``sizes`` (the timed comparison) takes over the file's date, machine, load and command; the parts
    not re-run then keep their own date and load as a ``rerun`` record, so every table says when it ran.
    """
    from .common import load_average, machine_info

    path = result_path(quick)
    out = json.loads(path.read_text())
    if "sizes" in parts:
        for part in ("real_embeddings", "imagenet_projection"):
            if part not in parts and isinstance(out.get(part), dict) and "rerun" not in out[part]:
                out[part]["rerun"] = {"date": out.get("date"), "load_before": out.get("load_before"),
                                      "load_after": out.get("load_after"),
                                      "torch_threads": (out.get("machine") or {}).get("torch_threads")}
        before, t0 = load_average(), time.perf_counter()
        sizes = QUICK_SIZES if quick else SIZES
        out["sizes"] = [bench_size(n_db, n_q, runs) for n_db, n_q, runs in sizes]
        out.update({"machine": machine_info(), "load_before": before, "load_after": load_average(),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": _command(),
                    "sizes_wall_s": time.perf_counter() - t0})
    fns = {"real_embeddings": real_embeddings_check, "imagenet_projection": imagenet_projection}
    for part in (p for p in parts if p != "sizes"):
        before = load_average()
        out[part] = fns[part](quick)
        out[part]["rerun"] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_before": before,
                              "load_after": load_average(), "torch_threads": torch.get_num_threads()}
    path.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, seconds instead of minutes")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--update", nargs="+", choices=("sizes", "real_embeddings", "imagenet_projection"),
                    help="re-run only these parts into the existing JSON")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.update:
        update(args.update, args.quick)
    else:
        run(args.quick, args.threads)
    sys.exit(0)
