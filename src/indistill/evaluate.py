"""Classification and retrieval metrics, and feature extraction for them.

Retrieval protocol (the paper's): the database is the training split without
augmentation, the queries are the test split, features are the embedding tap,
and a database item is relevant to a query when it has the same label.

Ranking
-------
Every database item gets a float64 *ranking key* per query, higher is better:

- ``cosine``:    ``(q . x) / ||x||`` -- the cosine similarity times the
  per-query constant ``||q||``, which cannot change the order. A zero
  database vector scores 0.
- ``euclidean``: ``2 q . x - ||x||^2`` -- minus the squared distance plus the
  per-query constant ``||q||^2``.

Ties rule: items with equal keys are ranked by database index, lower first
(what a stable argsort of the negated keys gives). Scores are computed in
float64 (the queries and database are cast to float64 before the matmul): on
float32 features a float32 matmul moves keys by ~1e-6 and changes the AP of
every query in the 7th digit, float64 agrees with any other float64 evaluation
of the same formula except for pairs closer than ~1e-16 relative. On
integer-valued features the keys are exact, so ties are exact ties.

Default algorithm (exact, ``exact=False``)
------------------------------------------
Every metric here is a function of the ranks of the relevant items only
(precision is the relevance count over the rank). Per chunk of queries of one
label (the database grouped by label, so the relevant items are one column
block):

1. one float64 matmul gives the keys (C, N);
2. the last mantissa bit of every key is overwritten with its relevance
   (1 = relevant). That moves a key by at most one ulp, so two keys keep their
   order unless they differ in that bit only;
3. each row is sorted (numpy's vectorised AVX-512 sort on CPU, several times
   faster than an argsort; ``torch.sort`` on CUDA) and the positions of the set
   tag bits are the ranks of the relevant items;
4. a relevant key whose sorted neighbour is an irrelevant key equal up to the
   tag bit (a tie, or a pair one ulp apart) flags its query, which is redone
   exactly: with one int64 key per item packing (float32 score bits, database
   index) when float32 holds all its keys exactly (integer-valued features),
   else with the grid algorithm below.

So the ranking is the float64 one with the index tie rule, like ``exact=True``
(results agree to summation order, ~1e-16). On CPU, whole chunks run side by
side on ``torch.get_num_threads()`` threads (at most 8), each thread's matmul
and sorts on one core. Memory is bounded by ``chunk_size`` x N scores per
thread (default at most 256 queries and ~2**25 scores on CPU, 2**27 scores on CUDA).

Grid algorithm (``exact=True``)
-------------------------------
No per-query sort of the database:

1. sort the R relevant keys (R ~ N / classes);
2. cut their range into 8R equal cells with a monotone float map
   (``floor((key - lo) * scale)``: every rounding step is monotone, so an item
   in a higher cell always has a higher key); tabulate per cell how many
   relevant keys lie in higher cells and the largest relevant key in it;
3. every irrelevant item gets "number of relevant items ranked above it" with
   two table look-ups and one comparison; items whose cell holds several
   relevant keys or a tie are resolved exactly against each of them (ties by
   database index); rows where that would be quadratic (huge tie blocks) fall
   back to a stable sort of the row;
4. a histogram of those counts gives the number of irrelevant items above the
   k-th relevant one, hence ``rank_k``.

Metrics (``protocol="standard"``)
---------------------------------
With ``rank_k`` the rank (1-based) of the k-th relevant item and R the number
of relevant items, ``prec_k = k / rank_k``:

- ``map``: mean over queries of ``mean_k prec_k`` (non-interpolated AP).
- ``map11``: mean over queries of the mean, over recall levels
  0, 0.1, ..., 1, of ``p_interp(r) = max{prec at any rank with recall >= r}``
  (the envelope over the whole ranking; its maxima sit at relevant ranks).
- ``p@k``: fraction of relevant items among the top k.
- ``pr_curve``: ``p_interp`` at recall 0, 0.05, ..., 1, averaged over queries.

Each is one :class:`RankMetric` of :data:`HEADLINE_METRICS` (per-query values from a chunk's
ranks, reported by their mean); more metrics, protocol independent, are one function each of
the ranks in :data:`RANK_METRICS` (``mrr``, ``r_precision``, a plug-in's), computed where named.

``protocol="reference"``
------------------------
Reproduces the arithmetic of the authors' released evaluation
(``Database.evaluate`` in InDistill's ``utils/retrieval_evaluation.py``, after
Passalis & Tefas): queries in order, in batches of 128 (the last one shorter).
For a batch of ``r`` queries they build precision at every rank, then run the
"make precision monotone" pass over column indices ``r-2 .. 0`` only (the loop
bound is the number of rows of the batch, not of ranks), so precision is a
running max from the right over ranks 1..r and raw beyond. Then, per recall
level L, they take the precision at the *first rank whose recall is closest to
L* (``argmin |recall - L|``; recall = count / class size, float64), with the
levels ``numpy.arange(0, 1.01, 0.1)`` (mAP) and ``numpy.arange(0, 1.01, 0.05)``
(the precision-recall curve). Their "top-k precision" is that partly monotone
precision at rank k averaged over queries.

Differences from ``standard``, all from that code:

1. the monotone envelope covers ranks 1..r (r = 128 for all but the last
   batch) instead of the whole ranking, so past rank 128 the value is the raw,
   non-interpolated precision;
2. the level is matched to the *closest* recall (which may be below the level)
   instead of "recall >= level";
3. ``p@k`` for k <= r is the max precision over ranks k..r, not the raw value
   (so reference ``p@1`` >= standard ``p@1``), and raw for k > r.

``map`` (non-interpolated) is protocol independent; ``map11``, ``p@k`` and
``pr_curve`` follow the protocol. What is not reproduced: the authors ranked
with sklearn's brute-force kNN (float32 distances, unspecified order among
ties); here the ranking is the float64 one with the tie rule above.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from .config import PROTOCOLS, RETRIEVAL_METRICS
from .data.base import DataSplits, Split
from .errors import UserError
from .models.taps import OUTPUT, Taps
from .registry import Registry

METRICS = RETRIEVAL_METRICS  # the similarities: cosine, euclidean (config.py's vocabulary)
REFERENCE_BATCH = 128  # the authors' query batch size; the monotone pass depends on it
_CELLS_PER_RELEVANT = 8  # grid resolution: few relevant keys share a cell
_PR_STEPS = 20  # pr_curve at recall 0, 0.05, ..., 1
# Default chunk of the fast path, in scores per chunk: each costs 8 bytes of work memory on CPU
# (float64 keys, sorted in place), ~24 on CUDA (torch.sort returns a copy plus int64 indices).
_CHUNK_SCORES = {"cpu": 1 << 25, "cuda": 1 << 27}
# ... and at most this many queries per CPU chunk: each thread's first chunk of a call touches fresh
# key-buffer pages (page faults, ~rows x N x 8 bytes), while fewer rows re-pack the database for the
# matmul more often; 256 beat both fewer rows and the 2**25-score budget alone on 2 threads (timings of
# the default path: benchmarks/results/retrieval.json).
_CPU_CHUNK_ROWS = 256
# Rows per block of the CPU tag-and-sort pass: 16 rows x 60k float64 keys ~ 8 MB, within a server
# core's share of cache, where a whole chunk (up to 256 rows x N x 8 bytes) is not.
_TAG_BLOCK_ROWS = 16
# Most chunk threads of the CPU fast path: each holds one chunk of scores (up to 256 MB) in flight.
_MAX_WORKERS = 8


# ----------------------------------------------------------------------------- classification


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy in percent, plus top-5 when there are more than 10 classes."""
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels).reshape(-1)
    if logits.dim() != 2 or logits.shape[0] != labels.numel():
        raise UserError(
            f"logits must be (N, classes) with one label per row, got logits {tuple(logits.shape)} "
            f"and {labels.numel()} labels; pass the model outputs and the split's labels"
        )
    if labels.numel() == 0:
        raise UserError("no samples to score; pass a non-empty split")
    labels = labels.to(logits.device).long()
    num_classes = logits.shape[1]
    out: dict[str, float] = {}
    ks = (1, 5) if num_classes > 10 else (1,)
    top = logits.topk(max(ks), dim=1).indices
    hit = top == labels[:, None]
    for k in ks:
        out[f"top{k}"] = 100.0 * hit[:, :k].any(dim=1).double().mean().item()
    return out


# ----------------------------------------------------------------------------- retrieval


def _keys(q: torch.Tensor, db: torch.Tensor, db_stat: torch.Tensor, metric: str) -> torch.Tensor:
    """float64 ranking keys (C, N), higher is better (see module docstring)."""
    if metric == "cosine":
        return torch.mm(q, db.T).div_(db_stat)  # db_stat: ||x||, 1 for zero rows
    return torch.addmm(db_stat, q, db.T, beta=1.0, alpha=2.0)  # db_stat: -||x||^2


def _cells(values: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, top: int) -> torch.Tensor:
    """Monotone cell index in [0, top]: floor(values * scale + shift), clamped."""
    x = torch.addcmul(shift, values, scale)
    return x.clamp_(0, top).long()


class _Grid(NamedTuple):
    """The sorted relevant keys of each row cut into cells (steps 1-2 of the grid algorithm).

    ``rs`` (C, R): relevant keys, descending; ``r_index``: their original database indices;
    ``scale``/``shift``/``top``: the monotone cell map (:func:`_cells`); per cell (C, M + 3): ``occ``
    relevant keys in it, ``above`` relevant keys in higher cells, ``first_val`` its largest relevant key
    (-inf if none), ``multi`` whether it holds more than one.
    """

    rs: torch.Tensor
    r_index: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    top: int
    occ: torch.Tensor
    above: torch.Tensor
    first_val: torch.Tensor
    multi: torch.Tensor


class _Ambiguous(NamedTuple):
    """Irrelevant items whose count of relevant keys above them the cell look-up cannot settle:
    row, column (label-sorted), cell (flat over rows) and the provisional count given them."""

    rows: torch.Tensor
    cols: torch.Tensor
    cells: torch.Tensor
    provisional: torch.Tensor


def _relevant_grid(keys: torch.Tensor, a: int, b: int, db_index: torch.Tensor) -> _Grid:
    """Sort each row's relevant keys (columns ``a:b``) and tabulate them per cell of their range."""
    C = keys.shape[0]
    R = b - a
    rs, rpos = torch.sort(keys[:, a:b], dim=1, descending=True, stable=True)
    r_index = db_index[a:b][rpos]  # original index of each sorted relevant item
    M = _CELLS_PER_RELEVANT * R
    lo, hi = rs[:, -1:], rs[:, :1]
    span = hi - lo
    scale = torch.where(span > 0, M / torch.where(span > 0, span, torch.ones_like(span)), torch.ones_like(span))
    # Cell 0: below every relevant key; cells 1..M+1 hold relevant keys; M+2: above all.
    shift = 1.0 - lo * scale
    top = M + 2
    width = M + 3
    rcell = _cells(rs, scale, shift, top)
    row_off = torch.arange(C, device=keys.device)[:, None] * width
    occ = torch.bincount((rcell + row_off).view(-1), minlength=C * width).view(C, width)
    above = R - occ.cumsum(1)  # relevant keys in higher cells
    # Sorted descending, so the largest relevant key of a cell sits at position above[cell].
    first_val = torch.gather(rs, 1, above.clamp(max=R - 1))
    first_val.masked_fill_(occ == 0, -torch.inf)
    return _Grid(rs, r_index, scale, shift, top, occ, above, first_val, occ > 1)


def _count_above(keys: torch.Tensor, a: int, b: int, g: _Grid) -> tuple[torch.Tensor, _Ambiguous | None]:
    """Per row, a histogram (C * (R + 1),) of "relevant keys above" over the irrelevant items, from
    two table look-ups each (step 3), and the items where that count is provisional: their cell holds
    a tie, or more than one relevant key above them."""
    dev = keys.device
    C, N = keys.shape
    R = b - a
    width = g.top + 1
    row_off = torch.arange(C, device=dev)[:, None] * width
    counts = torch.zeros(C * (R + 1), dtype=torch.long, device=dev)
    count_off = torch.arange(C, device=dev)[:, None] * (R + 1)
    amb: list[tuple[torch.Tensor, ...]] = []
    for c0, c1 in ((0, a), (b, N)):  # the irrelevant columns
        if c1 <= c0:
            continue
        s = keys[:, c0:c1]
        cell = _cells(s, g.scale, g.shift, g.top).add_(row_off)
        fv = torch.take(g.first_val, cell)
        gt = fv > s
        p = torch.take(g.above, cell).add_(gt)  # relevant keys above s, if the cell has no tie/second key
        counts += torch.bincount(p.add_(count_off).view(-1), minlength=C * (R + 1))
        unsure = (fv == s).logical_or_(gt.logical_and_(torch.take(g.multi, cell)))
        if bool(unsure.any()):
            rr, cc = torch.nonzero(unsure, as_tuple=True)
            amb.append((rr, cc + c0, cell[rr, cc], p[rr, cc]))
    if not amb:
        return counts, None
    return counts, _Ambiguous(*(torch.cat(x) for x in zip(*amb)))


def _resolve(
    keys: torch.Tensor, g: _Grid, counts: torch.Tensor, amb: _Ambiguous, db_index: torch.Tensor
) -> torch.Tensor:
    """Replace the provisional counts of ``amb`` (in ``counts``, in place) by exact ones, comparing each
    item with every relevant key of its cell (ties by database index). Returns the rows (C,) where that
    would cost more than a few passes over the row (huge tie blocks): their ranks come from a sort."""
    dev = keys.device
    C, N = keys.shape
    R = g.rs.shape[1]
    rr, cc, cf, prov = amb
    counts.index_add_(0, prov, torch.full_like(prov, -1))  # undo the provisional counts
    n_occ = g.occ.view(-1)[cf]
    work = torch.zeros(C, dtype=torch.long, device=dev).index_add_(0, rr, n_occ)
    sort_rows = work > 4 * N
    keep = ~sort_rows[rr]
    rr, cc, cf, n_occ = rr[keep], cc[keep], cf[keep], n_occ[keep]
    s = keys[rr, cc]
    s_index = db_index[cc]
    start = g.above.view(-1)[cf]
    p = start.clone()
    for t in range(int(n_occ.max()) if n_occ.numel() else 0):
        j = (start + t).clamp_(max=R - 1)
        r_val = g.rs[rr, j]
        beats = (r_val > s) | ((r_val == s) & (g.r_index[rr, j] < s_index))
        p += (beats & (n_occ > t)).long()
    counts.index_add_(0, rr * (R + 1) + p, torch.ones_like(p))
    return sort_rows


def _relevant_ranks(keys: torch.Tensor, a: int, b: int, db_index: torch.Tensor) -> torch.Tensor:
    """Ranks (C, R) of the relevant items, ascending, for keys over the label-sorted database: the grid
    algorithm of the module docstring.

    Columns ``a:b`` are the relevant ones; ``db_index`` maps a column to its
    original database index (for the tie rule).
    """
    C, N = keys.shape
    R = b - a
    g = _relevant_grid(keys, a, b, db_index)
    counts, amb = _count_above(keys, a, b, g)
    sort_rows = None if amb is None else _resolve(keys, g, counts, amb, db_index)
    counts = counts.view(C, R + 1)
    # Irrelevant items with p < k relevant keys above them are above the k-th relevant item (step 4).
    ranks = torch.arange(1, R + 1, device=keys.device)[None, :] + counts.cumsum(1)[:, :R]
    if sort_rows is not None and bool(sort_rows.any()):
        idx = torch.nonzero(sort_rows)[:, 0]
        ranks[idx] = _ranks_by_sort(keys[idx], a, b, db_index)
    return ranks


def _ranks_by_sort(keys: torch.Tensor, a: int, b: int, db_index: torch.Tensor) -> torch.Tensor:
    """Exact ranks (C, R), ascending, of the relevant items (columns ``a:b``) of label-sorted ``keys``:
    one stable sort per row, in original database order (the tie rule)."""
    C, N = keys.shape
    rel_mask = torch.zeros(N, dtype=torch.bool, device=keys.device)
    rel_mask[a:b] = True
    order = torch.argsort(db_index)  # back to original database order for the stable sort
    srt = torch.sort(keys[:, order], dim=1, descending=True, stable=True).indices
    rel_sorted = torch.gather(rel_mask[order].expand(C, N).contiguous(), 1, srt)
    pos = torch.nonzero(rel_sorted)[:, 1] + 1
    return pos.view(C, -1)


# ----------------------------------------------------------------------------- fast path (float32 scores)


class _Rows:
    """Runs numpy row-block work on a few threads (numpy's sort/searchsorted release the GIL)."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def run(self, n: int, fn: Callable[[int, int], None]) -> None:
        if self.pool is None or n < 2 * self.threads:
            fn(0, n)
            return
        step = -(-n // self.threads)
        list(self.pool.map(lambda r0: fn(r0, min(n, r0 + step)), range(0, n, step)))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _sort_rows(x: torch.Tensor, rows: _Rows) -> torch.Tensor:
    """Each row sorted ascending (values only), in place on CPU: numpy's vectorised (AVX-512) sort
    is many times faster than torch's CPU sort here; on CUDA, torch.sort (a new tensor)."""
    if x.is_cuda:
        return torch.sort(x, dim=1).values
    xn = x.numpy()

    def work(r0: int, r1: int) -> None:
        xn[r0:r1].sort(axis=1)

    rows.run(xn.shape[0], work)
    return x


def _count_le(seg: torch.Tensor, vals: torch.Tensor, rows: _Rows) -> torch.Tensor:
    """Per row, how many entries of the sorted ``seg`` are <= each of ``vals`` (ascending per row)."""
    if seg.is_cuda:
        return torch.searchsorted(seg, vals, right=True)
    sn, vn = seg.numpy(), vals.numpy()
    out = np.empty(vn.shape, np.int64)

    def work(r0: int, r1: int) -> None:
        for i in range(r0, r1):  # numpy's searchsorted is 1-d; sorted needles make it fast
            out[i] = np.searchsorted(sn[i], vn[i], side="right")

    rows.run(vn.shape[0], work)
    return torch.from_numpy(out)


def _packed_keys(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """One int64 per item whose ascending order is the ranking: score descending, then database index.

    High 32 bits: the float32 score's bits mapped to an order-preserving signed
    integer and negated; low 32 bits: the original database index (< 2**32).
    """
    bits = (scores + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into +0.0: they tie
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: larger magnitude lower
    return ((-ordered) << 32) | index


class _Database:
    """The label-sorted float64 database and per-item constants shared by all chunks."""

    def __init__(self, database: torch.Tensor, db_order: torch.Tensor, dev: torch.device, metric: str):
        self.metric = metric
        self.index = db_order.to(dev)
        identity = bool(torch.equal(db_order, torch.arange(len(db_order))))
        src = database.to(dev)
        if not identity:  # gathered before the cast: half the bytes for float32 features
            src = src[self.index]
        self.db64 = src.to(torch.float64)
        del src
        self.N = self.db64.shape[0]
        if metric == "cosine":
            norm = self.db64.norm(dim=1)
            self.stat64 = torch.where(norm > 0, norm, torch.ones_like(norm))
        else:
            self.stat64 = -(self.db64 * self.db64).sum(1)

    def keys(
        self,
        q64: torch.Tensor,
        c0: int = 0,
        c1: int | None = None,
        out: np.ndarray | None = None,
        finish: bool = True,
    ) -> torch.Tensor:
        """float64 keys of ``q64`` against database columns ``c0:c1`` (same formula as :func:`_keys`).

        On CPU, ``out`` (at least (len(q64), c1 - c0), C-contiguous rows) receives them: reusing one
        buffer per thread spares the page faults of a fresh multi-MB array per chunk.
        ``finish=False`` (CPU) returns the matmul only; :meth:`finish` then completes row blocks
        while they are in cache (one pass over memory fewer).
        """
        c1 = self.N if c1 is None else c1
        db, stat = self.db64[c0:c1], self.stat64[c0:c1]
        if q64.is_cuda:
            return _keys(q64, db, stat, self.metric)
        # numpy's BLAS call: faster than torch.mm for float64 on the machines benchmarked
        qn, dn = q64.numpy(), db.numpy()
        dst = None if out is None else out[: len(qn), : c1 - c0]
        # scaling by 2 is exact: 2 (q . x)
        dst = np.matmul(qn if self.metric == "cosine" else 2.0 * qn, dn.T, out=dst)
        if finish:
            self.finish(dst, c0, c1)
        return torch.from_numpy(dst)

    def finish(self, x: np.ndarray, c0: int = 0, c1: int | None = None) -> None:
        """In place: matmul products (rows over columns ``c0:c1``) -> keys; divide by ||x|| or add -||x||^2."""
        sn = self.stat64[c0 : self.N if c1 is None else c1].numpy()
        (np.divide if self.metric == "cosine" else np.add)(x, sn, out=x)


_NO_SIGN = np.int64(0x7FFF_FFFF_FFFF_FFFF)  # every bit of an int64 but the sign


def _tag_and_rank(
    s: torch.Tensor, a: int, b: int, rows: _Rows, finish: Callable[[np.ndarray], None] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (C, R), ascending, of the relevant items in each row's ascending key order, and a
    per-row flag: a relevant and an irrelevant key that agree up to the last bit (their order is
    then unknown here). Overwrites ``s``. ``finish`` (CPU): applied in place to each row block
    first (turns matmul products into keys while the block is in cache).

    The last mantissa bit of every key is replaced by its relevance (1 = relevant),
    which moves a key by at most one ulp: two keys keep their order unless they
    differ in the last bit only, and such pairs end up adjacent after the sort,
    where they are detected. Then one sort per row and the tag bits give the ranks.
    """
    C, N = s.shape
    R = b - a
    if s.is_cuda:
        bits = s.view(torch.int64)
        bits[:, :a] &= -2
        bits[:, b:] &= -2
        bits[:, a:b] |= 1
        srt = torch.sort(s, dim=1).values
        pos = torch.nonzero(srt.view(torch.int64) & 1)[:, 1].view(C, R)
        return pos, _collisions(srt, pos)
    sn = s.numpy()
    out = np.empty((C, R), np.int64)
    flag = np.zeros(C, bool)

    def work(r0: int, r1: int) -> None:
        # Row blocks small enough to stay in cache across the tag, sort and read-back passes.
        for b0 in range(r0, r1, _TAG_BLOCK_ROWS):
            block(b0, min(r1, b0 + _TAG_BLOCK_ROWS))

    def block(r0: int, r1: int) -> None:
        x = sn[r0:r1]
        if finish is not None:
            finish(x)
        bits = x.view(np.int64)
        bits[:, :a] &= -2
        bits[:, b:] &= -2
        bits[:, a:b] |= 1
        x.sort(axis=1)
        # The tag is bit 0 of the first byte (little-endian); flatnonzero is fastest on a bool array.
        tag = (x.view(np.uint8)[:, ::8] & 1).view(bool)
        flat = np.flatnonzero(tag).reshape(r1 - r0, R)
        out[r0:r1] = flat - (np.arange(r1 - r0) * N)[:, None]
        # Sorted neighbours whose bits differ in the tag bit only are a relevant and an irrelevant key
        # equal up to that bit. The sign bit is ignored too: a relevant +0 and an irrelevant -0 tie
        # (0 == -0), yet their tagged bits differ in the sign as well.
        d = bits[:, 1:] ^ bits[:, :-1]
        d &= _NO_SIGN
        flag[r0:r1] = (d == 1).any(1)

    rows.run(C, work)
    return torch.from_numpy(out), torch.from_numpy(flag)


def _collisions(srt: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rows where a relevant key (at ``pos``) and an adjacent irrelevant key are equal without their tag bit."""
    N = srt.shape[1]
    bits = srt.view(torch.int64)
    mine = (torch.gather(bits, 1, pos) & -2).view(torch.float64)
    hit = torch.zeros(srt.shape[0], dtype=torch.bool, device=srt.device)
    for step in (-1, 1):
        nb = (pos + step).clamp_(0, N - 1)
        nbits = torch.gather(bits, 1, nb)
        hit |= (((nbits & 1) == 0) & ((nbits & -2).view(torch.float64) == mine)).any(1)
    return hit


def _fast_relevant_ranks(
    q64: torch.Tensor, db: _Database, a: int, b: int, rows: _Rows, buf: np.ndarray | None = None
) -> torch.Tensor:
    """Ranks (C, R) of the relevant items (columns ``a:b``), ascending: the exact float64 ranking.

    One float64 matmul, then one sort per row of the keys with the relevance
    written into their last bit (:func:`_tag_and_rank`; numpy's vectorised sort
    on CPU, torch's on CUDA). Queries where a relevant and an irrelevant key
    tie (up to that bit) are redone exactly: with packed (float32 bits, index)
    int64 keys when float32 holds all their keys exactly (integer-valued
    features), else with :func:`_relevant_ranks`. ``buf``: a CPU work buffer for the keys
    (see :meth:`_Database.keys`), overwritten.
    """
    N, R = db.N, b - a
    if q64.is_cuda:
        pos, tie = _tag_and_rank(db.keys(q64), a, b, rows)
    else:
        pos, tie = _tag_and_rank(db.keys(q64, out=buf, finish=False), a, b, rows, db.finish)
    ranks = (N - pos).flip(1)  # ascending position -> descending rank
    tie_rows = torch.nonzero(tie)[:, 0]
    if tie_rows.numel():
        dev = q64.device
        j = torch.arange(1, R + 1, device=dev)
        spans = [(c0, c1) for c0, c1 in ((0, a), (b, N)) if c1 > c0]
        keys64 = db.keys(q64[tie_rows])
        lossless = (keys64 == keys64.float().double()).all(1)
        packed = tie_rows[lossless]
        if packed.numel():  # one int64 key per item: float32 bits (exact here), then the database index
            keys = _packed_keys(keys64[lossless].float(), db.index)
            rel_k = _sort_rows(keys[:, a:b], rows)
            ranks[packed] = j + sum(_count_le(_sort_rows(keys[:, c0:c1], rows), rel_k, rows) for c0, c1 in spans)
        lossy = ~lossless
        if bool(lossy.any()):
            ranks[tie_rows[lossy]] = _relevant_ranks(keys64[lossy], a, b, db.index)
    return ranks


# ----------------------------------------------------------------------------- metrics of the ranks
#
# Every metric is a function of the ranks of the relevant items. A chunk's ranks come wrapped in a
# `Ranked`, which computes what several metrics share once (precision at each relevant item, the
# reference protocol's precision table); a `RankMetric` turns it into per-query values, and reports
# their mean over the queries. The headline metrics are `HEADLINE_METRICS`, computed under every
# protocol; more (protocol independent) are one function each in `RANK_METRICS`, computed where named.


def _count_at(ranks: torch.Tensor, ns: torch.Tensor) -> torch.Tensor:
    """Number of relevant items within the top n, for each row of ranks and each n."""
    return torch.searchsorted(ranks, ns.expand(ranks.shape[0], -1).contiguous(), right=True)


class Ranked:
    """One chunk of C queries of one class, ranked: what every retrieval metric is computed from.

    ``ranks`` (C, R): per query, the 1-based ranks of its R relevant database items, ascending
    (``ranks[:, 0]`` is where the first relevant item came); ``ks``: the precision cut-offs asked for;
    ``batch_rows`` (C,): the size r of each query's batch in the authors' evaluation (the reference
    protocol; None without it). The properties are computed on first use, once per chunk.
    """

    def __init__(self, ranks: torch.Tensor, ks: Sequence[int], batch_rows: torch.Tensor | None = None):
        self.ranks = ranks
        self.ks = tuple(ks)
        self.batch_rows = batch_rows

    @cached_property
    def precision(self) -> torch.Tensor:
        """(C, R) float64: ``prec_k = k / rank_k``, the precision at each relevant item."""
        k = torch.arange(1, self.ranks.shape[1] + 1, device=self.ranks.device, dtype=torch.float64)
        return k / self.ranks.double()

    @cached_property
    def envelope(self) -> torch.Tensor:
        """(C, R): the largest precision at recall >= k / R (the standard interpolation)."""
        return self.precision.flip(1).cummax(1).values.flip(1)

    @cached_property
    def reference_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(raw, pm)``, (C, 128) each: precision at ranks 1..128, and the authors' partly monotone one."""
        n = torch.arange(1, REFERENCE_BATCH + 1, device=self.ranks.device)
        raw = _count_at(self.ranks, n).double() / n.double()
        inside = n[None, :] <= self.batch_rows[:, None]
        pm = torch.where(inside, raw, torch.full_like(raw, -1.0)).flip(1).cummax(1).values.flip(1)
        return raw, torch.where(inside, pm, raw)


class _Standard:
    """The standard protocol's arithmetic (module docstring, "Metrics")."""

    @staticmethod
    def recall_levels(steps: int) -> list[float]:
        return [i / steps for i in range(steps + 1)]

    @staticmethod
    def at_recall(r: Ranked, steps: int) -> torch.Tensor:
        """(C, steps + 1): interpolated precision at recall 0, 1/steps, ..., 1."""
        R = r.ranks.shape[1]
        i = torch.arange(steps + 1, device=r.ranks.device)
        kmin = ((i * R + steps - 1) // steps).clamp_(min=1)  # smallest k with k/R >= i/steps
        return r.envelope[:, kmin - 1]

    @staticmethod
    def precision_at_k(r: Ranked) -> torch.Tensor:
        """(C, len(ks)): the fraction of relevant items among the top k."""
        ns = torch.tensor(list(r.ks), device=r.ranks.device)
        return _count_at(r.ranks, ns).double() / ns.double()


class _Reference:
    """The arithmetic of the authors' evaluation (module docstring, ``protocol="reference"``)."""

    @staticmethod
    def recall_levels(steps: int) -> list[float]:
        return np.arange(0, 1.01, 1 / steps).tolist()  # exactly their float levels (1/10 == 0.1, 1/20 == 0.05)

    @staticmethod
    def at_recall(r: Ranked, steps: int) -> torch.Tensor:
        """(C, steps + 1): precision at the first rank whose recall is closest to each of their levels."""
        ranks, batch_rows = r.ranks, r.batch_rows
        C, R = ranks.shape
        dev = ranks.device
        raw, pm = r.reference_table
        lv = torch.tensor(np.arange(0, 1.01, 1 / steps), dtype=torch.float64, device=dev)
        base = torch.floor(lv * R).long()
        cand = base[None, :, None] + torch.arange(-1, 3, device=dev)[None, None, :]  # (1, L, 4)
        cand = cand.expand(C, -1, -1)
        valid = (cand >= 1) & (cand <= R) | ((cand == 0) & (ranks[:, 0] > 1)[:, None, None])  # 0: rank 1 irrelevant
        recall = cand.double() / float(R)
        dist = torch.where(valid, (recall - lv[None, :, None]).abs(), torch.full_like(recall, torch.inf))
        j = torch.gather(cand, 2, dist.argmin(2, keepdim=True)).squeeze(2)  # first rank closest
        rank_j = torch.gather(ranks, 1, (j - 1).clamp(min=0))
        idx = torch.where(j == 0, torch.zeros_like(j), rank_j - 1)  # 0-based rank index
        in_table = idx < batch_rows[:, None]
        from_table = torch.gather(pm, 1, idx.clamp(max=REFERENCE_BATCH - 1))
        raw_at = j.double() / rank_j.double()
        return torch.where(in_table, from_table, raw_at)

    @staticmethod
    def precision_at_k(r: Ranked) -> torch.Tensor:
        """(C, len(ks)): the partly monotone precision at rank k (raw beyond the batch's r)."""
        raw, pm = r.reference_table
        pk = []
        for k in r.ks:
            if k <= REFERENCE_BATCH:
                pk.append(torch.where(k <= r.batch_rows, pm[:, k - 1], raw[:, k - 1]))
            else:
                pk.append(_count_at(r.ranks, torch.tensor([k], device=r.ranks.device))[:, 0].double() / k)
        return torch.stack(pk, 1)


_PROTOCOL_ARITHMETIC = {"standard": _Standard, "reference": _Reference}


def _report_mean(name: str, values: torch.Tensor, ks: tuple[int, ...], protocol: Any) -> dict[str, Any]:
    return {name: values.mean().item()}


def _report_per_k(name: str, values: torch.Tensor, ks: tuple[int, ...], protocol: Any) -> dict[str, Any]:
    return {f"p@{k}": values[:, j].mean().item() for j, k in enumerate(ks)}


def _report_curve(name: str, values: torch.Tensor, ks: tuple[int, ...], protocol: Any) -> dict[str, Any]:
    return {name: {"recall": protocol.recall_levels(values.shape[1] - 1), "precision": values.mean(0).tolist()}}


@dataclass(frozen=True)
class RankMetric:
    """A retrieval metric: per-query values from a chunk's :class:`Ranked`, reported by their mean.

    ``values(ranked, protocol)``: (C,) or (C, m) float64 for the chunk's C queries, ``protocol`` being
    one protocol's arithmetic (``at_recall``, ``precision_at_k``, ``recall_levels``); a
    ``protocol_free`` metric gets None, is computed once and reported under every protocol.
    ``report(name, values, ks, protocol)`` turns the (Q,) / (Q, m) values of all the queries into
    result entries (default ``{name: mean}``; numbers come before curves in the result).
    ``summarised``: the ``(similarity, protocol)`` of each column a grid summarises the metric in, its
    result entry being ``entry`` (default the name) and its column label ``label`` (default the name)
    followed by the similarity (see :func:`summarised_results`).
    """

    name: str
    values: Callable[[Ranked, Any], torch.Tensor]
    protocol_free: bool = False
    report: Callable[[str, torch.Tensor, tuple[int, ...], Any], dict[str, Any]] = _report_mean
    summarised: tuple[tuple[str, str], ...] = ()
    entry: str = ""
    label: str = ""


_STANDARD = tuple((m, "standard") for m in METRICS)  # each similarity under the standard protocol
_REFERENCE = tuple((m, "reference") for m in METRICS)

#: What every retrieval evaluation reports, under each protocol (a new headline metric is one entry here).
HEADLINE_METRICS: tuple[RankMetric, ...] = (
    RankMetric("map", lambda r, p: r.precision.mean(1), protocol_free=True,  # non-interpolated AP
               summarised=_STANDARD, label="mAP"),
    RankMetric("map11", lambda r, p: p.at_recall(r, 10).mean(1),  # AP over recall 0, 0.1, ..., 1
               summarised=_REFERENCE, label="mAP11"),
    RankMetric("p@k", lambda r, p: p.precision_at_k(r), report=_report_per_k,  # "p@1", "p@10", ...
               summarised=(("cosine", "standard"), ("cosine", "reference")), entry="p@100", label="P@100"),
    RankMetric("pr_curve", lambda r, p: p.at_recall(r, _PR_STEPS), report=_report_curve),
)

#: Extra retrieval metrics, one function each: ``fn(ranks) -> (C,) float64`` per-query values, averaged over
#: the queries. ``ranks`` (C, R) holds, for C queries of one class, the 1-based ranks of their R relevant
#: database items in ascending order (``ranks[:, 0]`` is where the first relevant item came). Protocol
#: independent; named in ``evaluate.extra_metrics``; a plug-in adds one with ``RANK_METRICS.add(name, fn)``.
RANK_METRICS: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry(
    "retrieval metric", group="indistill.retrieval_metrics")
RANK_METRICS.add("mrr", lambda ranks: 1.0 / ranks[:, 0].double())  # mean reciprocal rank of the first hit
RANK_METRICS.add("r_precision", lambda ranks: _count_at(  # precision within the top R, R = relevant items
    ranks, torch.tensor([ranks.shape[1]], device=ranks.device))[:, 0].double() / ranks.shape[1])


def _rank_metric(name: str) -> RankMetric:
    """The :data:`RANK_METRICS` entry ``name`` as a protocol-free :class:`RankMetric`, summarised by a grid
    under the standard protocol (its value under every protocol)."""
    fn = RANK_METRICS.get(name)
    return RankMetric(name, lambda r, _p: fn(r.ranks), protocol_free=True, summarised=_STANDARD)


def _rank_metrics(extra: Sequence[str]) -> tuple[RankMetric, ...]:
    """The headline metrics, then the named :data:`RANK_METRICS` (each once)."""
    return (*HEADLINE_METRICS, *(_rank_metric(name) for name in dict.fromkeys(extra)))


def summarised_results() -> dict[str, str]:
    """The retrieval results a grid summarises: result key -> column label, e.g.
    ``"retrieval/cosine/reference/map11" -> "mAP11 cos (ref.)"``.

    Each :data:`HEADLINE_METRICS` entry's ``summarised`` columns, then every :data:`RANK_METRICS` entry's
    (built-in or a plug-in's, registered by then) in name order; a grid shows those its cells' results hold,
    so a metric in ``evaluate.extra_metrics`` appears in its report with no other change.
    """
    out: dict[str, str] = {}
    for m in (*HEADLINE_METRICS, *map(_rank_metric, RANK_METRICS.names())):
        for similarity, protocol in m.summarised:
            ref = " (ref.)" if protocol == "reference" else ""
            out[f"retrieval/{similarity}/{protocol}/{m.entry or m.name}"] = f"{m.label or m.name} {similarity[:3]}{ref}"
    return out


def _per_query(ranks: torch.Tensor, ks: Sequence[int], protocol: str = "standard",
               batch_rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Every headline metric's per-query values under one protocol."""
    r, p = Ranked(ranks, ks, batch_rows), _PROTOCOL_ARITHMETIC[protocol]
    return {m.name: m.values(r, None if m.protocol_free else p) for m in HEADLINE_METRICS}


class _Values:
    """Per-query values of every metric (under every protocol, or once if protocol free), written by
    chunks that may run side by side (each its own query rows, on its own thread), then averaged."""

    def __init__(self, metrics: Sequence[RankMetric], protocols: Sequence[str], num_queries: int):
        self.metrics = tuple(metrics)
        self.protocols = tuple(protocols)
        self.Q = num_queries
        self.tables: dict[tuple[int, str | None], torch.Tensor] = {}
        self.lock = threading.Lock()

    def _keys(self, m: RankMetric) -> tuple[str | None, ...]:
        return (None,) if m.protocol_free else self.protocols

    def add(self, idx: torch.Tensor, ranked: Ranked) -> None:
        """The values of query rows ``idx`` (CPU), from their ranks; written on the calling (chunk) thread."""
        for i, m in enumerate(self.metrics):
            for p in self._keys(m):
                v = m.values(ranked, p and _PROTOCOL_ARITHMETIC[p]).double().cpu()
                self._table((i, p), v.shape[1:])[idx] = v

    def _table(self, key: tuple[int, str | None], shape: torch.Size) -> torch.Tensor:
        """The (Q, ...) float64 table of ``key``, made by the first chunk that writes it."""
        table = self.tables.get(key)
        if table is None:
            with self.lock:
                table = self.tables.get(key)
                if table is None:
                    table = self.tables[key] = torch.empty((self.Q, *shape), dtype=torch.float64)
        return table

    def report(self, protocol: str, ks: tuple[int, ...]) -> dict[str, Any]:
        """The result entries of every metric under ``protocol``: numbers first, then curves."""
        out: dict[str, Any] = {}
        for i, m in enumerate(self.metrics):
            table = self.tables[(i, None if m.protocol_free else protocol)]
            out.update(m.report(m.name, table, ks, _PROTOCOL_ARITHMETIC[protocol]))
        curves = {k: v for k, v in out.items() if isinstance(v, dict)}
        return {k: v for k, v in out.items() if k not in curves} | curves


def _all_finite(x: torch.Tensor) -> bool:
    """No NaN or inf in ``x``: one min/max pass (NaN propagates through both), cheaper than isfinite().all()."""
    if not x.is_floating_point():
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _check_inputs(database, database_labels, queries, query_labels, metric, ks, protocols, chunk_size):
    if metric not in METRICS:
        raise UserError(f"unknown retrieval metric '{metric}'; use one of: {', '.join(METRICS)}")
    if not protocols:
        raise UserError("no retrieval protocol given; use one or more of: " + ", ".join(PROTOCOLS))
    for protocol in protocols:
        if protocol not in PROTOCOLS:
            raise UserError(f"unknown retrieval protocol '{protocol}'; use one of: {', '.join(PROTOCOLS)}")
    if database.dim() != 2 or queries.dim() != 2 or database.shape[1] != queries.shape[1]:
        raise UserError(
            f"database and queries must be (N, D) with the same D, got {tuple(database.shape)} and "
            f"{tuple(queries.shape)}; pass flattened embeddings"
        )
    if database_labels.numel() != database.shape[0] or query_labels.numel() != queries.shape[0]:
        raise UserError("need one label per database item and per query; check the label tensors")
    if database.shape[0] == 0 or queries.shape[0] == 0:
        raise UserError("empty database or query set; retrieval needs both")
    if not (_all_finite(database) and _all_finite(queries)):
        raise UserError("features contain NaN or inf; the model diverged or the inputs are broken")
    ks = tuple(int(k) for k in ks)
    if any(k < 1 or k > database.shape[0] for k in ks):
        raise UserError(f"every k in ks must be in 1..{database.shape[0]} (the database size), got {ks}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise UserError(f"chunk_size must be a positive number of queries, got {chunk_size}")
    return ks


def _buffered_ranker(db: _Database, rows_max: int) -> Callable[[torch.Tensor, int, int, _Rows], torch.Tensor]:
    """:func:`_fast_relevant_ranks` with one reused CPU key buffer (``rows_max`` x N) per calling thread."""
    local = threading.local()

    def rank(q64: torch.Tensor, a: int, b: int, rows: _Rows) -> torch.Tensor:
        buf = None
        if not q64.is_cuda:
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = np.empty((rows_max, db.N), np.float64)
        return _fast_relevant_ranks(q64, db, a, b, rows, buf)

    return rank


def _run_chunks(fn: Callable[[Any, _Rows], None], chunks: Sequence[Any], workers: int) -> None:
    """``fn(chunk, rows)`` over ``chunks``: whole chunks side by side on ``workers`` threads.

    Each thread runs its chunk's matmul and sorts alone: numpy's BLAS and torch are held to one
    thread meanwhile (restored after), since idle BLAS/OpenMP threads spinning beside the sort threads
    cost more than they give on a few cores. With one worker (or one chunk) the chunks run in
    order, a chunk's rows split over ``workers`` threads, BLAS held to ``workers`` threads too: with
    ``torch.set_num_threads(1)`` (e.g. one of several 1-thread worker processes) an unlimited BLAS
    would start one thread per core in every process. Exceptions propagate.
    """
    if workers <= 1 or len(chunks) <= 1:
        rows = _Rows(workers)
        try:
            with threadpool_limits(limits=max(1, workers), user_api="blas"):
                for ch in chunks:
                    fn(ch, rows)
        finally:
            rows.close()
        return
    single = _Rows(1)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda ch: fn(ch, single), chunks))  # list() re-raises a worker's exception
    finally:
        torch.set_num_threads(torch_threads)


class ChunkScorer:
    """The CPU default path of :func:`retrieval_metrics_multi` in its two parts, so that each can be timed
    alone (``benchmarks/retrieval.py`` projects an ImageNet-scale evaluation from them).

    Building it is the one-off setup: the float64 copy of ``database`` (already grouped by label, so
    that a class's items are one column block) and its norms. :meth:`run` is the per-chunk work: each
    chunk of queries of one class ranked against the database and every headline metric computed from
    the ranks under both protocols, ``workers`` chunks side by side as the default path runs them.
    """

    def __init__(self, database: torch.Tensor, metric: str = "cosine", ks: Sequence[int] = (1, 10, 100),
                 chunk_rows: int | None = None):
        self.db = _Database(database, torch.arange(len(database)), torch.device("cpu"), metric)
        self.ks = tuple(ks)
        #: the most queries in one chunk (default :func:`default_chunk_rows`): each thread's key buffer is that x N
        self.chunk_rows = chunk_rows or default_chunk_rows(len(database))
        #: chunks run side by side, as retrieval_metrics_multi runs them on this process's torch threads
        self.workers = min(torch.get_num_threads(), _MAX_WORKERS)
        self._rank = _buffered_ranker(self.db, self.chunk_rows)

    def run(self, chunks: Sequence[tuple[torch.Tensor, int, int]]) -> list[dict[str, dict[str, torch.Tensor]]]:
        """Per chunk ``(queries, a, b)`` (float64 (C, D) queries of one class, at most ``chunk_rows``;
        ``a:b`` their class's database block): ``{protocol: {metric: per-query values}}``, in chunk
        order; under the reference protocol each query's batch is a full one (128 queries)."""
        out: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in chunks]

        def work(i: int, rows: _Rows) -> None:
            q, a, b = chunks[i]
            ranks = self._rank(q, a, b, rows)
            out[i] = {"standard": _per_query(ranks, self.ks),
                      "reference": _per_query(ranks, self.ks, "reference", torch.full((len(q),), REFERENCE_BATCH))}

        _run_chunks(work, range(len(chunks)), self.workers)
        return out


def default_chunk_rows(n_database: int, device_type: str = "cpu", exact: bool = False) -> int:
    """Queries per chunk when ``chunk_size`` is not given: a score budget (2**25 on CPU, 2**27 on
    CUDA, 2**21 with ``exact``), and at most 256 on the CPU default path."""
    budget = (1 << 21) if exact else _CHUNK_SCORES["cuda" if device_type == "cuda" else "cpu"]
    rows = max(1, min(4096, budget // max(1, n_database)))
    return min(rows, _CPU_CHUNK_ROWS) if device_type == "cpu" and not exact else rows


def retrieval_metrics(
    database: torch.Tensor,
    database_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    metric: str = "cosine",
    ks: Iterable[int] = (1, 10, 100),
    protocol: str = "standard",
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    exact: bool = False,
) -> dict[str, Any]:
    """Retrieval mAP, 11-point mAP, precision@k and PR curve (module docstring has the definitions).

    ``database``/``queries`` are (N, D)/(Q, D) features, labels define relevance.
    At most ``chunk_size`` queries are scored at a time (default :func:`default_chunk_rows`:
    about 32M scores per chunk and at most 256 queries on CPU, 128M scores on CUDA; 2M with
    ``exact``), so memory is O(chunk_size * N) per thread
    (the CPU default path runs up to ``min(torch.get_num_threads(), 8)`` chunks at once).
    ``device`` runs the matmul and the ranking there (default: the database's
    device; on CUDA the sorts run on the GPU). ``exact=True`` uses the float64 grid
    algorithm instead of the default sort-based one (same ranking, slower).
    Returns plain Python numbers.
    """
    return retrieval_metrics_multi(
        database, database_labels, queries, query_labels, metric, ks, (protocol,), chunk_size, device, exact=exact
    )[protocol]


def retrieval_metrics_multi(
    database: torch.Tensor,
    database_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    metric: str = "cosine",
    ks: Iterable[int] = (1, 10, 100),
    protocols: Sequence[str] = PROTOCOLS,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    exact: bool = False,
    extra: Sequence[str] = (),
) -> dict[str, dict[str, Any]]:
    """:func:`retrieval_metrics` for several protocols at once, keyed by protocol; ``extra`` names
    :data:`RANK_METRICS` to compute as well (the same value under every protocol).

    The ranking (the costly part) is computed once per chunk of queries and shared by every metric
    (:data:`HEADLINE_METRICS` and ``extra``) under every protocol.
    """
    database = torch.as_tensor(database)
    queries = torch.as_tensor(queries)
    database_labels = torch.as_tensor(database_labels).reshape(-1)
    query_labels = torch.as_tensor(query_labels).reshape(-1)
    protocols = tuple(protocols)
    ks = _check_inputs(database, database_labels, queries, query_labels, metric, ks, protocols, chunk_size)
    dev = torch.device(device) if device is not None else database.device
    N, Q = database.shape[0], queries.shape[0]
    db_order, bounds, q_codes = _class_blocks(database_labels, query_labels)
    db = _Database(database, db_order, dev, metric)
    q_all = queries.to(dev, torch.float64)
    workers, chunk_size = _chunk_plan(N, Q, dev, exact, chunk_size)
    chunks = _query_chunks(q_codes, bounds, chunk_size, largest_first=workers > 1)
    rank = _chunk_ranker(db, q_all, chunk_size, exact)
    values = _Values(_rank_metrics(extra), protocols, Q)
    reference = "reference" in protocols

    def run_chunk(chunk: tuple[int, int, torch.Tensor], rows: _Rows) -> None:
        a, b, idx = chunk
        batch_rows = _reference_batch_rows(idx, Q).to(dev) if reference else None
        values.add(idx, Ranked(rank(a, b, idx, rows), ks, batch_rows))

    _run_chunks(run_chunk, chunks, workers)
    return {p: {**values.report(p, ks), "num_queries": Q, "metric": metric, "protocol": p} for p in protocols}


def _class_blocks(database_labels: torch.Tensor, query_labels: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The database grouped by label (stable: original order inside a label), so the items relevant to a
    query are one column block: ``(db_order, bounds, q_codes)``, class ``c``'s block being
    ``bounds[c]:bounds[c + 1]`` of the sorted database and ``q_codes`` each query's class."""
    N = database_labels.numel()
    all_labels, codes = torch.unique(torch.cat([database_labels.cpu(), query_labels.cpu()]), return_inverse=True)
    db_codes, q_codes = codes[:N], codes[N:]
    class_size = torch.bincount(db_codes, minlength=len(all_labels))
    missing = torch.unique(q_codes[class_size[q_codes] == 0])
    if missing.numel():
        raise UserError(
            f"query label(s) {all_labels[missing].tolist()[:5]} have no database items, so AP is undefined; "
            f"build the database from a split that contains every class"
        )
    db_order = torch.argsort(db_codes, stable=True)
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), class_size.cumsum(0)])
    return db_order, bounds, q_codes


def _chunk_plan(N: int, Q: int, dev: torch.device, exact: bool, chunk_size: int | None) -> tuple[int, int]:
    """``(workers, chunk_size)``: how many chunks run side by side, and the most queries in one.

    CPU fast path: whole chunks side by side (:func:`_run_chunks`), at least ``workers`` chunks where
    ``Q`` allows (splitting one chunk's rows over the threads around a multi-threaded BLAS call was no
    faster on 2 cores than one thread).
    """
    if chunk_size is None:
        chunk_size = default_chunk_rows(N, dev.type, exact)
    workers = min(torch.get_num_threads(), _MAX_WORKERS) if dev.type == "cpu" and not exact else 1
    if workers > 1:
        chunk_size = max(1, min(chunk_size, -(-Q // workers)))
    return workers, chunk_size


def _query_chunks(q_codes: torch.Tensor, bounds: torch.Tensor, chunk_size: int, largest_first: bool
                  ) -> list[tuple[int, int, torch.Tensor]]:
    """``(a, b, query rows)`` per chunk: each label's queries in equal chunks of at most ``chunk_size``,
    ``a:b`` their relevant block. ``largest_first``: most queries first (a row costs one pass over the
    database whatever its label), so threads taking chunks as they free up finish closer together."""
    chunks = []
    for c in torch.unique(q_codes).tolist():
        qi = torch.nonzero(q_codes == c)[:, 0]
        a, b = int(bounds[c]), int(bounds[c + 1])
        step = -(-len(qi) // -(-len(qi) // chunk_size))  # the label's queries in equal chunks of <= chunk_size
        chunks += [(a, b, qi[s0 : s0 + step]) for s0 in range(0, len(qi), step)]
    if largest_first:
        chunks.sort(key=lambda ch: -len(ch[2]))
    return chunks


def _chunk_ranker(db: _Database, q_all: torch.Tensor, chunk_size: int, exact: bool
                  ) -> Callable[[int, int, torch.Tensor, _Rows], torch.Tensor]:
    """``rank(a, b, query rows, rows)``: the ranks (C, R) of a chunk's relevant items (columns ``a:b``),
    by the grid algorithm (``exact``) or the default sort-based one."""
    dev = q_all.device
    if exact:
        def rank_exact(a: int, b: int, idx: torch.Tensor, _rows: _Rows) -> torch.Tensor:
            keys = _keys(q_all[idx.to(dev)], db.db64, db.stat64, db.metric)
            return _relevant_ranks(keys, a, b, db.index)

        return rank_exact
    fast = _buffered_ranker(db, chunk_size)
    return lambda a, b, idx, rows: fast(q_all[idx.to(dev)], a, b, rows)


def _reference_batch_rows(idx: torch.Tensor, Q: int) -> torch.Tensor:
    """The size r of the authors' query batch (128, the last one shorter) each query row of ``idx`` is in."""
    return torch.clamp(Q - (idx // REFERENCE_BATCH) * REFERENCE_BATCH, max=REFERENCE_BATCH)


# ----------------------------------------------------------------------------- models


@torch.no_grad()
def extract_features(
    model: nn.Module,
    tap_specs: Mapping[str, str],
    split: Split,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
) -> dict[str, torch.Tensor]:
    """Run ``model`` (eval mode, no grad) over ``split`` in order.

    Returns CPU tensors ``embedding`` (N, D) from ``tap_specs["embedding"]``,
    ``logits`` (from ``tap_specs["logits"]`` if given, else the model output)
    and ``labels``. Other taps in ``tap_specs`` are not recorded.

    Under torchrun this is a collective: every rank runs its slice of each global batch of
    ``batch_size * world`` (the split is read once in all) and every rank gets all features, in
    split order (so every rank can compute the same metrics, and none waits on another's extraction).
    """
    from . import distributed as ddp

    if "embedding" not in tap_specs:
        raise UserError(
            f"tap_specs has no 'embedding' entry (got {sorted(tap_specs)}); add e.g. embedding: 'fc:in'"
        )
    specs = {"embedding": tap_specs["embedding"], "logits": tap_specs.get("logits", OUTPUT)}
    was_training = model.training
    model.eval()
    emb, logits, labels, index = [], [], [], []
    world = ddp.world_size()
    if world > 1 and len(split) < world:  # decided alike on every rank: no rank may be left without rows
        raise UserError(f"{len(split)} samples cannot be shared by {world} processes; use fewer processes")
    try:
        with Taps(model, specs) as taps:
            for batch in ddp.rank_slices(split, batch_size * world, shuffle=False, device=device):
                if batch.labels.numel() == 0:
                    continue  # this rank's slice of a last batch smaller than the world size
                _, feats = taps(batch.images)
                emb.append(feats["embedding"].flatten(1).float().cpu())
                logits.append(feats["logits"].float().cpu())
                labels.append(batch.labels.cpu())
                index.append(batch.index.cpu())
    finally:
        model.train(was_training)
    if world > 1:
        # Ranks hold interleaved slices; gather them all, then put the rows back in split order.
        out = {k: ddp.all_gather_cat(torch.cat(v)) for k, v in
               (("embedding", emb), ("logits", logits), ("labels", labels), ("index", index))}
        order = torch.argsort(out.pop("index"))
        return {k: v[order] for k, v in out.items()}
    if not emb:
        raise UserError("the split yielded no batches; check the dataset")
    return {"embedding": torch.cat(emb), "logits": torch.cat(logits), "labels": torch.cat(labels)}


def evaluate_model(
    model: nn.Module,
    tap_specs: Mapping[str, str],
    data: DataSplits,
    device: torch.device | str = "cpu",
    metrics: Sequence[str] = METRICS,
    protocols: Sequence[str] = PROTOCOLS,
    ks: Sequence[int] = (1, 10, 100),
    extra_metrics: Sequence[str] = (),
) -> dict[str, Any]:
    """Top-1 (and top-5) on the test split and retrieval (db = train_eval, queries = test).

    Flat JSON-serialisable dict: ``top1``, ``retrieval/<metric>/<protocol>/<name>``
    for ``map``, ``map11`` and ``p@k``, and ``pr_curves`` mapping
    ``<metric>/<protocol>`` to ``{"recall": [...], "precision": [...]}``.
    """
    test = extract_features(model, tap_specs, data.test, device)
    db = extract_features(model, tap_specs, data.train_eval, device)
    out: dict[str, Any] = dict(classification_metrics(test["logits"], test["labels"]))
    out["num_test"] = int(test["labels"].numel())
    out["num_database"] = int(db["labels"].numel())
    pr: dict[str, Any] = {}
    ks = tuple(k for k in ks if k <= db["labels"].numel())
    for metric in metrics:
        both = retrieval_metrics_multi(
            db["embedding"], db["labels"], test["embedding"], test["labels"],
            metric=metric, ks=ks, protocols=tuple(protocols), device=device, extra=tuple(extra_metrics),
        )
        for protocol, r in both.items():
            prefix = f"retrieval/{metric}/{protocol}"
            # every number a metric reported (num_queries, metric and protocol describe the call)
            out.update({f"{prefix}/{name}": v for name, v in r.items() if isinstance(v, float)})
            pr[f"{metric}/{protocol}"] = r["pr_curve"]
    out["pr_curves"] = pr
    return out
