"""How much the authors' evaluation protocol moves retrieval numbers vs the standard one.

Features: scikit-learn digits (the package's `digits` split), a fixed random projection
to 64-d followed by ReLU. Writes benchmarks/results/protocol_shift.json.
Run: python benchmarks/protocol_shift.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from indistill.data import get_dataset
from indistill.evaluate import retrieval_metrics


def run(quick: bool = False) -> dict:
    data = get_dataset("digits")

    def feats(split):
        x = torch.cat([b.images.flatten(1) for b in split.batches(512)])
        return x, split.labels

    db, db_y = feats(data.train_eval)
    q, q_y = feats(data.test)
    proj = torch.randn(db.shape[1], 64, generator=torch.Generator().manual_seed(0))
    db, q = torch.relu(db @ proj), torch.relu(q @ proj)
    out: dict = {"database": len(db_y), "queries": len(q_y), "features": "digits pixels @ randn(1024, 64), ReLU"}
    for metric in ("cosine", "euclidean"):
        for protocol in ("standard", "reference"):
            r = retrieval_metrics(db, db_y, q, q_y, metric=metric, protocol=protocol, ks=(1, 10, 100))
            out[f"{metric}/{protocol}"] = {k: 100 * r[k] for k in ("map", "map11", "p@1", "p@10", "p@100")}
    return out


if __name__ == "__main__":
    res = run()
    path = Path(__file__).parent / "results" / "protocol_shift.json"
    path.write_text(json.dumps(res, indent=1))
    for metric in ("cosine", "euclidean"):
        s, r = res[f"{metric}/standard"], res[f"{metric}/reference"]
        print(metric, " ".join(f"{k}: {s[k]:.2f} -> {r[k]:.2f}" for k in s))
