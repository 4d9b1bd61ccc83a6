"""Evaluation metrics against slow, obviously-correct float64 references written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from indistill.data.base import Batch, DataSplits, Split
from indistill.errors import UserError
from indistill.evaluate import (
    classification_metrics,
    evaluate_model,
    extract_features,
    retrieval_metrics,
    retrieval_metrics_multi,
)

# ----------------------------------------------------------------------------- references


def ref_keys(db: np.ndarray, q: np.ndarray, metric: str) -> np.ndarray:
    """Ranking keys, higher is better, by explicit loops (exact on integer-valued data)."""
    db = db.astype(np.float64)
    q = q.astype(np.float64)
    keys = np.empty((len(q), len(db)))
    for i in range(len(q)):
        for j in range(len(db)):
            if metric == "cosine":
                dot = float(np.sum(q[i] * db[j]))
                nrm = math.sqrt(float(np.sum(db[j] * db[j])))
                keys[i, j] = dot / nrm if nrm > 0 else 0.0  # cosine * ||q||, constant per query
            else:
                keys[i, j] = -float(np.sum((q[i] - db[j]) ** 2))
    return keys


def ref_relevance_lists(keys, db_labels, q_labels):
    """Relevance (0/1) along each query's full ranking; ties broken by database index."""
    out = []
    for i in range(len(q_labels)):
        order = np.argsort(-keys[i], kind="stable")
        out.append((db_labels[order] == q_labels[i]).astype(np.int64))
    return out


def ref_standard(rel_lists, ks):
    aps, ap11s, curves, pks = [], [], [], []
    for rel in rel_lists:
        n_rel = rel.sum()
        hits, precs, recalls, ap_terms = 0, [], [], []
        for n, r in enumerate(rel, start=1):
            hits += r
            precs.append(hits / n)
            recalls.append(hits / n_rel)
            if r:
                ap_terms.append(hits / n)
        aps.append(sum(ap_terms) / n_rel)

        def interp(level):
            return max(p for p, rc in zip(precs, recalls) if rc >= level - 1e-12)

        ap11s.append(np.mean([interp(i / 10) for i in range(11)]))
        curves.append([interp(i / 20) for i in range(21)])
        pks.append([sum(rel[:k]) / k for k in ks])
    return {
        "map": float(np.mean(aps)),
        "map11": float(np.mean(ap11s)),
        "pr": np.mean(curves, axis=0),
        "pk": np.mean(pks, axis=0),
    }


def ref_authors(rel_lists, db_labels, q_labels, ks, batch=128):
    """The authors' loop, re-implemented from its description: batches of 128 queries,
    'monotone' pass over range(rows - 1) columns, level matched by argmin |recall - level|."""
    counts = {c: int((db_labels == c).sum()) for c in np.unique(db_labels)}
    n_db = len(db_labels)
    levels, fine = np.arange(0, 1.01, 0.1), np.arange(0, 1.01, 0.05)
    ap_all, fine_all, prec_all = [], [], []
    for b0 in range(0, len(rel_lists), batch):
        rel = np.array(rel_lists[b0 : b0 + batch])
        tg = q_labels[b0 : b0 + batch]
        prec = np.cumsum(rel, axis=1) / np.arange(1, n_db + 1)
        for col in range(rel.shape[0] - 2, -1, -1):
            prec[:, col] = np.maximum(prec[:, col], prec[:, col + 1])
        recall = np.cumsum(rel, axis=1) / np.array([counts[t] for t in tg], dtype=np.float64)[:, None]
        for row in range(rel.shape[0]):
            at = [prec[row, np.argmin(np.abs(recall[row] - lv))] for lv in levels]
            ap_all.append(np.mean(at))
            fine_all.append([prec[row, np.argmin(np.abs(recall[row] - lv))] for lv in fine])
            prec_all.append(prec[row, [k - 1 for k in ks]])
    return {"map11": float(np.mean(ap_all)), "pr": np.mean(fine_all, 0), "pk": np.mean(prec_all, 0)}


def check_against_ref(db, dbl, q, ql, metric, ks, chunk_size=None):
    keys = ref_keys(db, q, metric)
    rel = ref_relevance_lists(keys, dbl, ql)
    std = ref_standard(rel, ks)
    auth = ref_authors(rel, dbl, ql, ks)
    out_s = retrieval_metrics(torch.tensor(db), torch.tensor(dbl), torch.tensor(q), torch.tensor(ql),
                              metric=metric, ks=ks, chunk_size=chunk_size)
    out_r = retrieval_metrics(torch.tensor(db), torch.tensor(dbl), torch.tensor(q), torch.tensor(ql),
                              metric=metric, ks=ks, chunk_size=chunk_size, protocol="reference")
    # Same ranking, same arithmetic up to summation order: equal to ~1 ulp.
    tol = dict(rel=1e-12, abs=1e-12)
    assert out_s["map"] == pytest.approx(std["map"], **tol)
    assert out_s["map11"] == pytest.approx(std["map11"], **tol)
    assert out_s["pr_curve"]["precision"] == pytest.approx(list(std["pr"]), **tol)
    for j, k in enumerate(ks):
        assert out_s[f"p@{k}"] == pytest.approx(std["pk"][j], **tol)
    assert out_r["map"] == pytest.approx(std["map"], **tol)
    assert out_r["map11"] == pytest.approx(auth["map11"], **tol)
    assert out_r["pr_curve"]["precision"] == pytest.approx(list(auth["pr"]), **tol)
    for j, k in enumerate(ks):
        assert out_r[f"p@{k}"] == pytest.approx(auth["pk"][j], **tol)
    return out_s, out_r, std, auth


# ----------------------------------------------------------------------------- hand example


def test_hand_computed_tiny_example():
    # Database on a line (1-d features, euclidean): positions 0..5, labels a a b a b b.
    db = np.array([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0]])
    dbl = np.array([0, 0, 1, 0, 1, 1])
    # q0 at 0.9, label a: ranking by distance 1(.1) 0(.9) 2(1.1) 3(2.1) 4 5 -> a a b a b b
    #   relevant at ranks 1,2,4: AP = (1/1 + 2/2 + 3/4)/3 = 2.75/3
    #   envelope: recall 1/3 at p=1, 2/3 at p=1, 1 at p=.75 -> levels 0..0.6 -> 1 (7 levels),
    #   0.7..1 -> 0.75 (4 levels): AP11 = (7 + 3)/11 = 10/11
    #   P@1 = 1, P@2 = 1, P@3 = 2/3
    # q1 at 4.4, label a: ranking 4(.4) 5(.6) 3(1.4) 2 1 0 -> b b a b a a
    #   relevant at ranks 3,5,6: AP = (1/3 + 2/5 + 3/6)/3 = (1.2333..)/3
    #   envelope: levels 0..0.3 -> max(1/3, 2/5, 1/2) = 0.5 (4 levels); 0.4..0.6 -> max(2/5, 1/2)
    #   = 0.5 (3); 0.7..1 -> 0.5 (4): AP11 = 0.5.  P@1 = 0, P@2 = 0, P@3 = 1/3
    # q2 at 2.0, label b: distances 2(0) 1,3 tie (1) 0,4 tie (2) 5(3): ties by index:
    #   2 1 3 0 4 5 -> b a a a b b: relevant at ranks 1,5,6: AP = (1 + 2/5 + 3/6)/3 = 1.9/3
    #   envelope: levels 0..0.3 -> 1 (4 levels); 0.4..1 -> max(2/5, 1/2) = 0.5 (7): AP11 = 7.5/11
    #   P@1 = 1, P@2 = 1/2, P@3 = 1/3
    q = np.array([[0.9], [4.4], [2.0]])
    ql = np.array([0, 0, 1])
    out = retrieval_metrics(torch.tensor(db), torch.tensor(dbl), torch.tensor(q), torch.tensor(ql),
                            metric="euclidean", ks=(1, 2, 3))
    assert out["map"] == pytest.approx((2.75 / 3 + (1 / 3 + 2 / 5 + 1 / 2) / 3 + 1.9 / 3) / 3, abs=1e-12)
    assert out["map11"] == pytest.approx((10 / 11 + 0.5 + 7.5 / 11) / 3, abs=1e-12)
    assert out["p@1"] == pytest.approx(2 / 3)
    assert out["p@2"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert out["p@3"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 3) / 3)
    assert out["num_queries"] == 3 and out["metric"] == "euclidean" and out["protocol"] == "standard"
    # Reference protocol, one batch of r = 3 queries: precision made monotone over ranks 1..3 only.
    # q0 precisions 1, 1, 2/3, 3/4, 3/5, 1/2 -> monotone part ranks 1..3: 1, 1, 2/3 (rest raw).
    #   recall 1/3, 2/3, 2/3, 1, 1, 1. Level 0 -> closest recall 1/3 (first rank) -> 1;
    #   0.1, 0.2, 0.3, 0.4 -> 1/3 -> rank 1 -> 1; 0.5 (|2/3-.5| < |1/3-.5|) ... 0.8 -> 2/3 -> rank 2 -> 1;
    #   0.9, 1.0 -> recall 1 at rank 4 (raw 3/4). AP = (9*1 + 2*0.75)/11 = 10.5/11.
    # q1 precisions 0, 0, 1/3, 1/4, 2/5, 1/2 -> monotone over ranks 1..3: 1/3, 1/3, 1/3.
    #   recall 0, 0, 1/3, 1/3, 2/3, 1. Level 0 -> rank 1 -> 1/3; 0.1 (closer to 0) -> rank 1 -> 1/3;
    #   0.2..0.4 -> 1/3 at rank 3 -> 1/3 (0.2 closer to 1/3 than to 0: .133 < .2);
    #   0.5 -> tie between 1/3 and 2/3 broken in floats; 0.6, 0.7, 0.8 -> 2/3 at rank 5 -> raw 2/5;
    #   0.9, 1 -> rank 6 -> 1/2.
    q1_levels = np.arange(0, 1.01, 0.1)
    rec = np.array([0, 0, 1 / 3, 1 / 3, 2 / 3, 1.0])
    pm = np.array([1 / 3, 1 / 3, 1 / 3, 1 / 4, 2 / 5, 1 / 2])
    q1_ap = np.mean([pm[np.argmin(np.abs(rec - lv))] for lv in q1_levels])  # only to settle 0.5
    assert q1_ap == pytest.approx((5 * (1 / 3) + (1 / 3 if abs(1 / 3 - 0.5) <= abs(2 / 3 - 0.5) else 0.4)
                                   + 3 * 0.4 + 2 * 0.5) / 11)
    # q2 precisions 1, 1/2, 1/3, 1/4, 2/5, 1/2 -> monotone ranks 1..3: 1, 1/2, 1/3.
    #   recall 1/3 (ranks 1-4), 2/3 (5), 1 (6): levels 0..0.4 -> rank 1 -> 1 (5 levels);
    #   0.5 tie again; 0.6..0.8 -> rank 5 -> 2/5; 0.9, 1 -> rank 6 -> 1/2.
    q2_ap = (5 * 1 + (1 if abs(1 / 3 - 0.5) <= abs(2 / 3 - 0.5) else 0.4) + 3 * 0.4 + 2 * 0.5) / 11
    ref = retrieval_metrics(torch.tensor(db), torch.tensor(dbl), torch.tensor(q), torch.tensor(ql),
                            metric="euclidean", ks=(1, 2, 3), protocol="reference")
    assert ref["map11"] == pytest.approx((10.5 / 11 + q1_ap + q2_ap) / 3, abs=1e-12)
    # Reference P@k = partly monotone precision at rank k: q0 1,1,2/3; q1 1/3,1/3,1/3; q2 1,1/2,1/3.
    assert ref["p@1"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    assert ref["p@2"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
    assert ref["p@3"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 3) / 3)
    assert ref["map"] == out["map"]


# ----------------------------------------------------------------------------- golden, random


def _integer_data(seed, n_db, n_q, dim, classes, lo=-2, hi=3):
    rng = np.random.default_rng(seed)
    db = rng.integers(lo, hi, size=(n_db, dim)).astype(np.float32)
    q = rng.integers(lo, hi, size=(n_q, dim)).astype(np.float32)
    db[:5] = db[5:10]  # exact duplicates: ties for every query
    db[10] = 0.0  # a zero vector (cosine key 0)
    dbl = rng.integers(0, classes, n_db)
    ql = rng.integers(0, classes, n_q)
    return db, dbl, q, ql


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_golden_integer_features_with_ties(metric, chunk_size):
    db, dbl, q, ql = _integer_data(1, 90, 23, 3, 4)
    check_against_ref(db, dbl, q, ql, metric, ks=(1, 5, 30), chunk_size=chunk_size)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_golden_continuous_features(metric):
    rng = np.random.default_rng(2)
    centers = rng.normal(size=(5, 8))
    dbl = rng.integers(0, 5, 300)
    ql = rng.integers(0, 5, 40)
    db = (centers[dbl] + rng.normal(size=(300, 8))).astype(np.float32)
    q = (centers[ql] + rng.normal(size=(40, 8))).astype(np.float32)
    check_against_ref(db, dbl, q, ql, metric, ks=(1, 10, 100), chunk_size=16)


def test_golden_heavy_ties_take_the_sort_fallback():
    # Binary 2-d features: only 4 distinct vectors, so every cell is one huge tie block.
    rng = np.random.default_rng(3)
    db = rng.integers(0, 2, size=(200, 2)).astype(np.float32)
    q = rng.integers(0, 2, size=(9, 2)).astype(np.float32)
    dbl, ql = rng.integers(0, 3, 200), rng.integers(0, 3, 9)
    for metric in ("cosine", "euclidean"):
        check_against_ref(db, dbl, q, ql, metric, ks=(1, 50))


def test_reference_protocol_two_batches_partly_monotone_bug_matters():
    # 150 queries -> batches of 128 and 22: the monotone pass covers ranks 1..128, then 1..22.
    db, dbl, q, ql = _integer_data(4, 400, 150, 4, 3, lo=-3, hi=4)
    out_s, out_r, std, auth = check_against_ref(db, dbl, q, ql, "cosine", ks=(1, 10, 100, 200))
    assert out_r["map11"] != pytest.approx(out_s["map11"], abs=1e-6)
    assert out_r["p@1"] > out_s["p@1"]  # running max from the right lifts rank-1 precision
    assert out_r["p@200"] == pytest.approx(out_s["p@200"], abs=1e-12)  # beyond rank 128: raw


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_multi_protocol_shares_the_ranking_and_equals_single_calls(metric):
    db, dbl, q, ql = _integer_data(6, 300, 140, 4, 3, lo=-3, hi=4)
    args = (torch.tensor(db), torch.tensor(dbl), torch.tensor(q), torch.tensor(ql))
    both = retrieval_metrics_multi(*args, metric=metric, ks=(1, 10, 200), protocols=("standard", "reference"),
                                   chunk_size=9)
    assert set(both) == {"standard", "reference"}
    for protocol, got in both.items():
        single = retrieval_metrics(*args, metric=metric, ks=(1, 10, 200), protocol=protocol)
        assert got == single  # same numbers, bit for bit, whatever the chunking
    with pytest.raises(UserError):
        retrieval_metrics_multi(*args, protocols=())


def test_labels_need_not_be_contiguous_and_order_is_irrelevant():
    rng = np.random.default_rng(5)
    db = rng.normal(size=(120, 6)).astype(np.float32)
    q = rng.normal(size=(30, 6)).astype(np.float32)
    dbl = rng.choice([-4, 7, 100], 120)
    ql = rng.choice([-4, 7, 100], 30)
    out = check_against_ref(db, dbl, q, ql, "euclidean", ks=(3,))[0]
    perm = rng.permutation(30)
    again = retrieval_metrics(torch.tensor(db), torch.tensor(dbl), torch.tensor(q[perm]), torch.tensor(ql[perm]),
                              metric="euclidean", ks=(3,))
    assert again["map"] == pytest.approx(out["map"], abs=1e-12)


def test_bad_inputs_raise_user_errors():
    db, dbl = torch.randn(10, 3), torch.arange(10) % 2
    q, ql = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(UserError, match="unknown retrieval metric"):
        retrieval_metrics(db, dbl, q, ql, metric="cosin")
    with pytest.raises(UserError, match="protocol"):
        retrieval_metrics(db, dbl, q, ql, protocol="paper")
    with pytest.raises(UserError, match="database size"):
        retrieval_metrics(db, dbl, q, ql, ks=(11,))
    with pytest.raises(UserError, match="no database items"):
        retrieval_metrics(db, dbl, q, torch.tensor([0, 1, 2, 1]), ks=(1,))
    with pytest.raises(UserError, match="same D"):
        retrieval_metrics(db, dbl, torch.randn(4, 2), ql, ks=(1,))
    with pytest.raises(UserError, match="NaN"):
        retrieval_metrics(db, dbl, q.masked_fill(q > 0, float("nan")), ql, ks=(1,))
    for bad in (float("inf"), -float("inf"), float("nan")):  # a single bad database value, either sign
        broken = db.clone()
        broken[3, 1] = bad
        with pytest.raises(UserError, match="NaN or inf"):
            retrieval_metrics(broken, dbl, q, ql, ks=(1,))
        with pytest.raises(UserError, match="NaN or inf"):
            retrieval_metrics(broken.double(), dbl, q, ql, ks=(1,))


# ----------------------------------------------------------------------------- classification


def test_classification_top1_top5_golden():
    logits = torch.tensor(
        [
            [0.0, 5, 4, 3, 2, 1, 0, 0, 0, 0, 0, 0],  # label 1: top-1 hit
            [9.0, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0, 0],  # label 4: 5th -> top-5 hit only
            [9.0, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0, 0],  # label 5: 6th -> miss
            [0.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3],  # label 11: hit
        ]
    )
    out = classification_metrics(logits, torch.tensor([1, 4, 5, 11]))
    assert out == {"top1": 50.0, "top5": 75.0}
    out10 = classification_metrics(logits[:, :10], torch.tensor([1, 4, 5, 0]))
    assert out10 == {"top1": 25.0}  # 10 classes: no top-5
    with pytest.raises(UserError):
        classification_metrics(logits, torch.tensor([1, 2]))


# ----------------------------------------------------------------------------- models


class _TensorSplit(Split):
    def __init__(self, x, y):
        self.x, self.y = x, y

    @property
    def labels(self):
        return self.y

    def batches(self, batch_size, *, shuffle=False, seed=0, epoch=0, device="cpu", drop_last=False):
        assert not shuffle
        for i in range(0, len(self.y), batch_size):
            sl = slice(i, i + batch_size)
            yield Batch(self.x[sl].to(device), self.y[sl].to(device), torch.arange(len(self.y))[sl])


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.body(x))


def _toy_data():
    g = torch.Generator().manual_seed(0)
    y_tr = torch.arange(60) % 3
    y_te = torch.arange(21) % 3
    x_tr = torch.randn(60, 1, 2, 2, generator=g) + y_tr.view(-1, 1, 1, 1)
    x_te = torch.randn(21, 1, 2, 2, generator=g) + y_te.view(-1, 1, 1, 1)
    tr = _TensorSplit(x_tr, y_tr)
    return DataSplits("toy", 3, 1, 2, tr, tr, _TensorSplit(x_te, y_te))


def test_extract_features_matches_manual_forward_and_restores_mode():
    torch.manual_seed(0)
    model = _Tiny().train()
    data = _toy_data()
    feats = extract_features(model, {"embedding": "fc:in", "stage": "body.1"}, data.test, batch_size=8)
    assert model.training
    model.eval()
    with torch.no_grad():
        emb = model.body(data.test.x)
        logits = model.fc(emb)
    assert torch.allclose(feats["embedding"], emb) and torch.allclose(feats["logits"], logits)
    assert torch.equal(feats["labels"], data.test.y)
    assert set(feats) == {"embedding", "logits", "labels"}
    with pytest.raises(UserError, match="embedding"):
        extract_features(model, {"stage": "body.1"}, data.test)


def test_evaluate_model_is_flat_json_and_consistent():
    import json

    torch.manual_seed(0)
    model = _Tiny()
    data = _toy_data()
    out = evaluate_model(model, {"embedding": "fc:in"}, data, ks=(1, 10, 100))
    json.dumps(out)
    assert "retrieval/cosine/standard/map" in out and "retrieval/euclidean/reference/map11" in out
    assert "retrieval/cosine/standard/p@100" not in out  # k larger than the database is dropped
    assert set(out["pr_curves"]) == {"cosine/standard", "cosine/reference", "euclidean/standard",
                                     "euclidean/reference"}
    f_db = extract_features(model, {"embedding": "fc:in"}, data.train_eval)
    f_q = extract_features(model, {"embedding": "fc:in"}, data.test)
    direct = retrieval_metrics(f_db["embedding"], f_db["labels"], f_q["embedding"], f_q["labels"], ks=(10,))
    assert out["retrieval/cosine/standard/p@10"] == direct["p@10"]
    top1 = 100.0 * (f_q["logits"].argmax(1) == f_q["labels"]).double().mean().item()
    assert out["top1"] == pytest.approx(top1)


# ----------------------------------------------------------------------------- fast path vs float64 path


def _all_values(res: dict) -> dict[str, float]:
    """Every scalar metric and PR-curve point of a retrieval_metrics_multi result, flat."""
    out = {}
    for protocol, r in res.items():
        out.update({f"{protocol}/{k}": v for k, v in r.items() if isinstance(v, float)})
        out.update({f"{protocol}/pr{i}": v for i, v in enumerate(r["pr_curve"]["precision"])})
    return out


def _fast_vs_exact(db, dbl, q, ql, metric, ks=(1, 10, 100), **kw):
    args = [torch.as_tensor(x) for x in (db, dbl, q, ql)]
    fast = _all_values(retrieval_metrics_multi(*args, metric=metric, ks=ks, **kw))
    exact = _all_values(retrieval_metrics_multi(*args, metric=metric, ks=ks, exact=True))
    assert fast.keys() == exact.keys()
    return fast, exact


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_fast_path_equals_float64_path_overlapping_classes(metric):
    # Overlapping clusters (heavily interleaved relevant / irrelevant items), 2 query batches.
    rng = np.random.default_rng(7)
    centers = rng.normal(size=(6, 24)) * 0.3
    dbl, ql = rng.integers(0, 6, 2500), rng.integers(0, 6, 300)
    db = (centers[dbl] + rng.normal(size=(2500, 24))).astype(np.float32)
    q = (centers[ql] + rng.normal(size=(300, 24))).astype(np.float32)
    fast, exact = _fast_vs_exact(db, dbl, q, ql, metric)
    for k in fast:  # the same float64 ranking: equal up to summation order, far inside 1e-6
        assert fast[k] == pytest.approx(exact[k], abs=1e-12), k


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_fast_path_equals_float64_path_with_ties(metric):
    # Integer features: many exact ties between relevant and irrelevant items (cosine: keys not
    # representable in float32 -> grid fallback; euclidean: integer keys -> packed-key path).
    db, dbl, q, ql = _integer_data(8, 1500, 200, 3, 4, lo=-3, hi=4)
    fast, exact = _fast_vs_exact(db, dbl, q, ql, metric, ks=(1, 10, 300))
    for k in fast:
        assert fast[k] == pytest.approx(exact[k], abs=1e-12), k
    check_against_ref(db[:400], dbl[:400], q[:40], ql[:40], metric, ks=(1, 10, 100))


def test_packed_keys_order_is_score_descending_then_index():
    from indistill.evaluate import _packed_keys

    scores = torch.tensor([[0.5, -0.0, 2.0, 0.5, -3.0, 0.0, 2.0, -1e-30, 1e30, -0.5]], dtype=torch.float32)
    index = torch.tensor([9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    order = torch.argsort(_packed_keys(scores, index)[0])
    expected = sorted(range(10), key=lambda i: (-float(scores[0, i]), int(index[i])))  # -0.0 == 0.0: a tie
    assert order.tolist() == expected


def test_tag_and_rank_flags_ties_the_tag_bit_hides_signed_zeros_included():
    # The CPU tag pass flags a query whose relevant key ties an irrelevant one up to the tag bit: an
    # exact tie, a pair one ulp apart, and +0 against -0 (equal keys whose bits differ in the sign too).
    from indistill.evaluate import _Rows, _tag_and_rank

    one_ulp = float(np.nextafter(0.75, 1.0))
    rows = [  # columns 2:4 are the relevant block
        ([1.0, -2.0, 0.5, 0.25, -1.0], False),
        ([1.0, 0.5, 0.5, 0.25, -1.0], True),  # exact tie
        ([1.0, 0.75, one_ulp, 0.25, -1.0], True),  # differ in the last bit only
        ([1.0, -0.0, 0.0, 0.25, -1.0], True),  # relevant +0, irrelevant -0
        ([1.0, 0.0, -0.0, 0.25, -1.0], True),  # relevant -0, irrelevant +0
        ([1.0, -0.0, 0.0, 0.0, -1.0], True),
        ([-0.0, 2.0, 0.5, 0.25, 0.0], False),  # signed zeros, both irrelevant
        ([1.0, -0.0, 0.0, -0.0, -1.0], True),  # both signs within the relevant block, one irrelevant
    ]
    keys = torch.tensor([r for r, _ in rows], dtype=torch.float64)
    pos, flag = _tag_and_rank(keys.clone(), 2, 4, _Rows(1))
    assert flag.tolist() == [f for _, f in rows]
    assert pos[0].tolist() == [2, 3]  # ascending positions of 0.25 and 0.5 among the sorted keys


def test_packed_key_tie_rule_exact_ties_rank_by_database_index():
    # Euclidean, 1-d integer features: every key is an exact tie block of relevant and irrelevant
    # items; equal scores must rank by database index, lower first (the stable-sort rule).
    rng = np.random.default_rng(9)
    db = rng.integers(0, 3, size=(1200, 1)).astype(np.float32)
    dbl = rng.integers(0, 2, 1200)
    q = np.array([[0.0], [1.0], [2.0], [1.0]], dtype=np.float32)
    ql = np.array([0, 1, 0, 0])
    out = retrieval_metrics(torch.tensor(db), torch.tensor(dbl), torch.tensor(q), torch.tensor(ql),
                            metric="euclidean", ks=(1, 5, 500))
    std = ref_standard(ref_relevance_lists(ref_keys(db, q, "euclidean"), dbl, ql), (1, 5, 500))
    assert out["map"] == pytest.approx(std["map"], abs=1e-12)
    assert out["map11"] == pytest.approx(std["map11"], abs=1e-12)
    assert [out["p@1"], out["p@5"], out["p@500"]] == pytest.approx(list(std["pk"]), abs=1e-12)
    # Reversing the database order reverses the order inside each tie block; still the stable-sort rule.
    rev = retrieval_metrics(torch.tensor(db[::-1].copy()), torch.tensor(dbl[::-1].copy()), torch.tensor(q),
                            torch.tensor(ql), metric="euclidean", ks=(1, 5, 500))
    std_rev = ref_standard(ref_relevance_lists(ref_keys(db[::-1], q, "euclidean"), dbl[::-1], ql), (1, 5, 500))
    assert rev["p@5"] == pytest.approx(std_rev["pk"][1], abs=1e-12)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_fast_path_chunked_equals_unchunked(metric):
    rng = np.random.default_rng(10)
    db = rng.normal(size=(1800, 8)).astype(np.float32)
    q = rng.normal(size=(150, 8)).astype(np.float32)
    dbl, ql = rng.integers(0, 3, 1800), rng.integers(0, 3, 150)
    args = [torch.tensor(x) for x in (db, dbl, q, ql)]
    whole = retrieval_metrics_multi(*args, metric=metric, chunk_size=10_000)
    for chunk in (1, 13):
        assert retrieval_metrics_multi(*args, metric=metric, chunk_size=chunk) == whole


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_cuda_fast_path_equals_cpu_float64_path(metric):
    rng = np.random.default_rng(11)
    centers = rng.normal(size=(5, 32)) * 0.3
    dbl, ql = rng.integers(0, 5, 3000), rng.integers(0, 5, 260)
    db = torch.tensor(centers[dbl] + rng.normal(size=(3000, 32)), dtype=torch.float32)
    q = torch.tensor(centers[ql] + rng.normal(size=(260, 32)), dtype=torch.float32)
    gpu = _all_values(retrieval_metrics_multi(db.cuda(), torch.tensor(dbl).cuda(), q.cuda(), torch.tensor(ql).cuda(),
                                              metric=metric, chunk_size=50))
    cpu = _all_values(retrieval_metrics_multi(db, torch.tensor(dbl), q, torch.tensor(ql), metric=metric, exact=True))
    for k in cpu:
        assert gpu[k] == pytest.approx(cpu[k], abs=1e-12), k
    dbi, dbli, qi, qli = _integer_data(12, 1500, 60, 3, 4)  # ties: the packed-key / grid fallbacks on the GPU
    gpu = retrieval_metrics(*(torch.tensor(x).cuda() for x in (dbi, dbli, qi, qli)), metric=metric)
    cpu = retrieval_metrics(*(torch.tensor(x) for x in (dbi, dbli, qi, qli)), metric=metric, exact=True)
    assert gpu["map"] == pytest.approx(cpu["map"], abs=1e-12) and gpu["p@10"] == pytest.approx(cpu["p@10"], abs=1e-12)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_parallel_chunks_equal_one_thread_and_restore_thread_settings(metric):
    # Whole chunks run on several threads (BLAS and torch held to one thread each meanwhile). Integer
    # features give tie rows (packed-key and grid redo paths), uneven chunk counts per label.
    from threadpoolctl import threadpool_info

    db, dbl, q, ql = _integer_data(11, 1200, 97, 3, 5, lo=-3, hi=4)
    args = [torch.as_tensor(x) for x in (db, dbl, q, ql)]
    before = torch.get_num_threads()
    blas_before = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    try:
        torch.set_num_threads(1)
        one = retrieval_metrics_multi(*args, metric=metric, chunk_size=9)
        torch.set_num_threads(3)
        assert retrieval_metrics_multi(*args, metric=metric, chunk_size=9) == one
        assert retrieval_metrics_multi(*args, metric=metric) == one  # default chunking split for 3 workers
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"] == blas_before
    check_against_ref(db[:300], dbl[:300], q, ql, metric, ks=(1, 10, 100), chunk_size=4)


def test_one_torch_thread_holds_blas_to_one_thread(monkeypatch):
    # torch.set_num_threads(1) is the thread budget of a 1-thread worker process: the default path's
    # numpy matmul must not start one BLAS thread per core beside it (2 such processes ran 2x slower).
    from threadpoolctl import threadpool_info, threadpool_limits

    import indistill.evaluate as ev

    seen: list[list[int]] = []
    keys = ev._Database.keys

    def spy(self, *a, **k):
        seen.append([p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"])
        return keys(self, *a, **k)

    monkeypatch.setattr(ev._Database, "keys", spy)
    db, dbl, q, ql = _integer_data(13, 400, 30, 3, 4, lo=-3, hi=4)
    args = [torch.as_tensor(x) for x in (db, dbl, q, ql)]
    before = torch.get_num_threads()
    try:
        with threadpool_limits(limits=2, user_api="blas"):
            torch.set_num_threads(1)
            one = retrieval_metrics_multi(*args, metric="cosine")
            assert seen and all(n == [1] * len(n) and n for n in seen), seen
            assert all(p["num_threads"] == 2 for p in threadpool_info() if p["user_api"] == "blas")
            torch.set_num_threads(2)
            seen.clear()
            sub = [args[0], args[1], args[2][:1], args[3][:1]]  # one query: a single chunk
            assert retrieval_metrics_multi(*sub, metric="cosine") == retrieval_metrics_multi(*sub, metric="cosine",
                                                                                             exact=True)
            assert seen and all(n == [2] * len(n) and n for n in seen), seen
    finally:
        torch.set_num_threads(before)


def test_concurrent_callers_get_lone_results_and_thread_settings_come_back():
    # Callers evaluating at once (threads of one process) get the results of a lone call, and the
    # torch/BLAS thread settings the parallel path lowers meanwhile come back.
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_info, threadpool_limits

    db, dbl, q, ql = _integer_data(12, 900, 60, 3, 4, lo=-3, hi=4)
    args = [torch.as_tensor(x) for x in (db, dbl, q, ql)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with threadpool_limits(limits=2, user_api="blas"):
            alone = retrieval_metrics_multi(*args, metric="cosine", chunk_size=5)
            with ThreadPoolExecutor(4) as pool:
                results = list(pool.map(lambda _: retrieval_metrics_multi(*args, metric="cosine", chunk_size=5),
                                        range(12)))
            assert all(r == alone for r in results)
            blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
            assert blas and all(n == 2 for n in blas), blas  # every BLAS loaded (numpy's, scipy's, ...)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_chunk_scorer_is_the_default_paths_per_chunk_work():
    # a label-grouped database: each class's items are one column block, as ChunkScorer expects
    g = torch.Generator().manual_seed(3)
    db = torch.randn(90, 6, generator=g)
    db_labels = torch.arange(3).repeat_interleave(30)
    q = torch.randn(24, 6, generator=g)
    q_labels = torch.arange(3).repeat_interleave(8)
    from indistill.evaluate import ChunkScorer

    scorer = ChunkScorer(db, "euclidean", ks=(1, 5), chunk_rows=4)
    chunks = [(q[i : i + 4].double(), 30 * (i // 8), 30 * (i // 8 + 1)) for i in range(0, 24, 4)]
    out = scorer.run(chunks)
    assert len(out) == len(chunks) and set(out[0]) == {"standard", "reference"}
    want = retrieval_metrics(db, db_labels, q, q_labels, "euclidean", ks=(1, 5))
    per_query = {m: torch.cat([o["standard"][m] for o in out]) for m in ("map", "map11", "p@k")}
    assert per_query["map"].mean().item() == pytest.approx(want["map"], abs=1e-12)
    assert per_query["map11"].mean().item() == pytest.approx(want["map11"], abs=1e-12)
    assert per_query["p@k"].mean(0).tolist() == pytest.approx([want["p@1"], want["p@5"]], abs=1e-12)
