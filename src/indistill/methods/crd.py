"""Contrastive representation distillation with the CRD benchmark's NCE memory bank."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as ddp
from ..data.base import Batch
from ..errors import UserError
from ._common import add_ce, check_choice, check_positive, full, no_autocast
from .base import Method, MethodContext, register_method

#: guards the NCE divisions, as in the benchmark
NCE_EPS = 1e-7
#: score the whole memory bank (one matmul) when it has at most this many times K+1 entries
DENSE_SCORES_FACTOR = 8


def nce_loss(scores: torch.Tensor, num_samples: int) -> torch.Tensor:
    """NCE loss of CRD's Eq. 18 on (B, K+1) normalised scores, column 0 the positive.

    With noise distribution ``P_n = 1/N`` and ``m = K``:
    ``-(sum_b log(P_pos / (P_pos + m P_n)) + sum_{b,k} log(m P_n / (P_neg + m P_n))) / B``.
    """
    b, m = scores.shape[0], scores.shape[1] - 1
    mpn = m / float(num_samples)
    pos, neg = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(pos / (pos + mpn + NCE_EPS))
    log_d0 = torch.log(mpn / (neg + mpn + NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / b


@register_method
class CRD(Method):
    """CRD on the embedding tap, with CE.

    Both embeddings go through a linear head to ``feat_dim`` and are L2-normalised.
    Two memory banks (``num_samples x feat_dim`` buffers) hold a momentum
    average (``nce_m``) of each side's embedding per training sample. For each
    sample, its own slot (positive) and ``nce_k`` other slots (negatives) of
    the *other* side's bank are scored ``exp(<v, m> / nce_t) / Z``, ``Z`` fixed
    at the first batch, and both directions' NCE losses are summed.

    Negatives are drawn with the global torch RNG (so runs are reproducible
    from the seed). ``negatives="other_class"`` (default) follows the CRD
    benchmark's "exact" sampling (negatives from other classes): labels of the
    samples seen so far are kept in a buffer and same-class draws are redrawn
    (samples not yet seen count as other-class, so the first epoch is close to,
    not exactly, class-exact). ``"uniform"`` draws from all samples.

    Under torchrun the banks stay identical on every rank: each rank gathers the whole global
    batch's indices, labels and embeddings, draws the negatives for the whole batch (the same draws
    on every rank: the stage seeds every rank alike) and keeps its own rows, updates the banks with
    every rank's rows, and sets ``Z`` from the global batch. K ranks compute what one process with
    the same global batch computes, up to float summation order.

    Defaults are CRD's: ``feat_dim=128, nce_k=16384`` (capped at
    ``num_samples - 1``), ``nce_t=0.07, nce_m=0.5, weight=0.8`` (``-b 0.8``), ``ce=1``.
    """

    name = "crd"
    paper = "Tian, Krishnan, Isola. Contrastive Representation Distillation. ICLR 2020"
    summary = "contrastive (NCE) matching of embeddings against a memory bank of negatives"
    uses = ("logits", "embedding")

    def __init__(
        self,
        ctx: MethodContext,
        *,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
        negatives: str = "other_class",
        weight: float = 0.8,
        ce: float = 1.0,
    ):
        super().__init__(ctx)
        n = int(ctx.num_samples)
        if n < 2:
            raise UserError("method 'crd' needs the training-set size (num_samples >= 2) for its memory bank")
        check_positive(self.name, feat_dim=feat_dim, nce_k=nce_k, nce_t=nce_t)
        if not 0 <= nce_m < 1:
            raise UserError(f"method 'crd': nce_m must be in [0, 1), got {nce_m}")
        check_choice(self.name, "negatives", negatives, ("other_class", "uniform"))
        self.num_samples, self.nce_k = n, min(int(nce_k), n - 1)
        self.nce_t, self.nce_m, self.negatives = float(nce_t), float(nce_m), negatives
        self.weight, self.ce = float(weight), float(ce)
        d_s = math.prod(ctx.student_shapes["embedding"])
        d_t = math.prod(ctx.teacher_shapes["embedding"])
        self.embed_s = nn.Linear(d_s, feat_dim)
        self.embed_t = nn.Linear(d_t, feat_dim)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(n, feat_dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("memory_t", torch.rand(n, feat_dim).mul_(2 * stdv).sub_(stdv))
        # Normalisation constants Z (student anchor, teacher anchor); < 0 = not yet set.
        self.register_buffer("z", torch.full((2,), -1.0))
        self.register_buffer("sample_labels", torch.full((n,), -1, dtype=torch.long))

    @torch.no_grad()
    def sample_negatives(self, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, K+1) memory indices: column 0 the samples themselves, then ``nce_k`` negatives."""
        b, n, k = index.shape[0], self.num_samples, self.nce_k
        neg = torch.randint(n, (b, k), device=index.device)
        if self.negatives == "other_class":
            self.sample_labels[index] = labels
            flat, own = neg.view(-1), labels.repeat_interleave(k)
            # Only redrawn slots can turn bad, so each round re-checks the previous round's bad slots
            # (ascending flat positions: the draws land where a full-mask `neg[bad] = ...` puts them,
            # the same numbers as re-checking every slot, at ~1/num_classes of its lookups per round).
            pos = torch.nonzero(self.sample_labels[flat] == own)[:, 0]
            for _ in range(32):  # each round leaves ~ (1/num_classes) of the bad draws
                if pos.numel() == 0:
                    break
                flat[pos] = torch.randint(n, (pos.numel(),), device=index.device)
                pos = pos[self.sample_labels[flat[pos]] == own[pos]]
        return torch.cat([index[:, None], neg], dim=1)

    def _scores(self, v: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor, which: int) -> torch.Tensor:
        b, k1 = idx.shape
        if memory.shape[0] <= DENSE_SCORES_FACTOR * k1:
            # Score the whole bank with one (B, D) x (D, N) matmul and pick the K+1 entries: the
            # benchmark's way gathers B x (K+1) x D bank rows (1 GB per side per step at B=128,
            # K=16384, D=128), which dominates a CPU step; when N is not much larger than K+1
            # the matmul touches far less memory. Same values up to summation order. The bank is
            # copied because autograd keeps it for v's gradient and _update writes it in place.
            dots = (v @ memory.clone().t()).gather(1, idx)
        else:
            w = memory[idx.reshape(-1)].view(b, k1, -1)
            dots = torch.bmm(w, v.unsqueeze(2)).squeeze(2)
        out = torch.exp(dots / self.nce_t)
        if self.z[which] < 0:
            # As in the benchmark: Z from the first batch, so that scores are ~1/N on average
            # (the global batch's mean under torchrun, so every rank sets the same Z).
            stats = ddp.all_reduce_sum(torch.stack([out.detach().sum(), out.new_tensor(float(out.numel()))]))
            self.z[which] = stats[0] / stats[1] * self.num_samples
        # clone: z is written in place for the other direction, which autograd must not see.
        return out / self.z[which].clone()

    @torch.no_grad()
    def _update(self, memory: torch.Tensor, index: torch.Tensor, v: torch.Tensor) -> None:
        pos = memory[index] * self.nce_m + v.detach() * (1 - self.nce_m)
        memory[index] = F.normalize(pos, dim=1)

    def forward(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor], batch: Batch, epoch: int) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        s = full(student["embedding"]).flatten(1)
        t = full(teacher["embedding"].detach()).flatten(1)
        with no_autocast(s):
            dtype = self.embed_s.weight.dtype
            v_s = F.normalize(self.embed_s(s.to(dtype)), dim=1)
            v_t = F.normalize(self.embed_t(t.to(dtype)), dim=1)
            index = batch.index.to(self.memory_s.device)
            labels = batch.labels.to(index.device)
            # The global batch (this rank's rows start at `lo`); all of it in one process.
            all_index, lo = ddp.all_gather_cat(index), ddp.rows_before(index.shape[0])
            idx = self.sample_negatives(all_index, ddp.all_gather_cat(labels))[lo: lo + index.shape[0]]
            # Student anchor vs the teacher bank, teacher anchor vs the student bank.
            out_s = self._scores(v_s, self.memory_t, idx, 0)
            out_t = self._scores(v_t, self.memory_s, idx, 1)
            loss = nce_loss(out_s, self.num_samples) + nce_loss(out_t, self.num_samples)
            self._update(self.memory_s, all_index, ddp.all_gather_cat(v_s.detach()))
            self._update(self.memory_t, all_index, ddp.all_gather_cat(v_t.detach()))
            terms["crd"] = self.weight * loss
            add_ce(terms, student["logits"], batch.labels, self.ce)
        return terms
