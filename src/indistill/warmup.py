"""The InDistill warmup as one object: the pruned source, the curriculum and the per-phase loss.

:func:`build_warmup` is the one factory that ``indistill run``, ``indistill
validate`` and ``indistill prune`` all call, so the channels ``prune`` shows are
the ones a run distils from. :class:`InDistillWarmup` is shaped like a KD
method: ``forward(student_feats, batch, epoch)`` returns named loss terms for
the phase active in that (0-based, arm-relative) epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import WarmupSpec
from .curriculum import Schedule, default_schedule
from .data.base import Batch
from .errors import UserError
from .methods import pkt_loss
from .models import Taps, model_taps
from .pairing import TapPairs, pair_taps
from .prune import PrunedTeacher, prune_to_student
from .registry import Registry


@dataclass(frozen=True)
class WarmupLoss:
    """A curriculum phase's loss: ``fn(student_tap, target, **options) -> scalar``, logged as ``<label>/<tap>``.

    ``options`` maps a keyword of ``fn`` to the :class:`~indistill.config.WarmupSpec` field it is read from
    (PKT: ``{"variant": "pkt_variant"}``); :meth:`bind` fixes them for one warmup.
    """

    fn: Callable[..., torch.Tensor]
    label: str
    options: Mapping[str, str] = field(default_factory=dict)

    def bind(self, spec: WarmupSpec) -> WarmupLoss:
        """This loss with its ``options`` read from ``spec``."""
        if not self.options:
            return self
        kw = {k: getattr(spec, f) for k, f in self.options.items()}
        return WarmupLoss(partial(self.fn, **kw), self.label)


#: phase losses by name (``warmup.tap_loss``, ``warmup.embedding_loss``); a plug-in adds one with
#: ``WARMUP_LOSSES.add("cosine", WarmupLoss(fn, "cos"))``. PKT's variant is ``warmup.pkt_variant`` (a config
#: naming the former ``pkt_original`` is read through ``config.upgrade_legacy``).
WARMUP_LOSSES: Registry[WarmupLoss] = Registry("warmup loss", group="indistill.warmup_losses")
WARMUP_LOSSES.add("mse", WarmupLoss(lambda s, t: F.mse_loss(s.flatten(1), t.flatten(1)), "mse"))
WARMUP_LOSSES.add("pkt", WarmupLoss(pkt_loss, "pkt", {"variant": "pkt_variant"}))

#: ``f(taps, spec) -> Schedule``: the curriculum over the student taps (``warmup.schedule``)
ScheduleFn = Callable[[list[str], WarmupSpec], Schedule]
WARMUP_SCHEDULES: Registry[ScheduleFn] = Registry("warmup schedule", group="indistill.warmup_schedules")


@WARMUP_SCHEDULES.register("default")
def _default(taps: list[str], spec: WarmupSpec) -> Schedule:
    """The paper's: tap k for ``a + k`` epochs (or ``phase_epochs``), then the optional embedding phase."""
    return default_schedule(
        taps, a=spec.a, phase_epochs=spec.phase_epochs, tap_loss=spec.tap_loss,
        embedding_loss=spec.embedding_loss, embedding_epochs=spec.embedding_epochs,
    )


class InDistillWarmup(nn.Module):
    """The curriculum over a pruned source: exactly one tap's loss per epoch, shallow to deep."""

    def __init__(self, pruned: PrunedTeacher, schedule: Schedule, losses: Mapping[str, WarmupLoss] | None = None):
        super().__init__()
        self.pruned = pruned
        self.schedule = schedule
        #: each phase's loss by name, bound to the warmup's options (default: the registered ones as they are)
        self.losses = {p.loss: (losses or {}).get(p.loss) or WARMUP_LOSSES.get(p.loss) for p in schedule}

    @property
    def epochs(self) -> int:
        """How many of the arm's first epochs the warmup occupies."""
        return self.schedule.total

    @property
    def student_taps(self) -> list[str]:
        """The student taps the phases read (the embedding included if it has a phase)."""
        return list(dict.fromkeys(p.tap for p in self.schedule))

    def phase_name(self, epoch: int) -> str:
        p = self.schedule.phase_at(epoch)
        return f"{p.tap}:{p.loss}"

    def table(self) -> list[dict[str, Any]]:
        """The pruning table (one row per pair) of the source."""
        return self.pruned.table()

    def prune_record(self) -> dict[str, Any]:
        """What ``prune_<arm>.json`` holds: the table, the kept channels and the schedule."""
        return {
            "rows": self.pruned.table(),
            "kept": {k: v.tolist() for k, v in self.pruned.kept.items()},
            "schedule": [{"tap": p.tap, "loss": p.loss, "epochs": p.epochs, "start": p.start} for p in self.schedule],
        }

    def forward(self, student: Mapping[str, torch.Tensor], batch: Batch, epoch: int) -> dict[str, torch.Tensor]:
        """The active phase's loss between the student's tap and the pruned source's target."""
        phase = self.schedule.phase_at(epoch)
        loss = self.losses[phase.loss]
        with torch.no_grad():
            target = self.target(batch.images, phase.tap)
        return {f"{loss.label}/{phase.tap}": loss.fn(student[phase.tap], target)}

    def target(self, x: torch.Tensor, key: str) -> torch.Tensor:
        """The pruned source's target for ``key`` (:meth:`PrunedTeacher.target`)."""
        return self.pruned.target(x, key)


def warmup_schedule(spec: WarmupSpec, student: nn.Module, pairs: TapPairs | Mapping[str, str]) -> Schedule:
    """The curriculum of ``spec`` over the student taps paired in ``pairs`` (shallow to deep)."""
    paired = pairs.student_taps if isinstance(pairs, TapPairs) else list(pairs.values())
    taps = spec.taps or paired
    missing = [t for t in taps if t not in paired]
    if missing:
        raise UserError(f"warmup.taps {missing} have no teacher tap paired in warmup.pairs; pair them or drop them")
    schedule = WARMUP_SCHEDULES.get(spec.schedule)(list(taps), spec)
    for p in schedule:
        WARMUP_LOSSES.get(p.loss)  # an unknown loss fails here, before any training
    return schedule


def warmup_losses(spec: WarmupSpec, schedule: Schedule) -> dict[str, WarmupLoss]:
    """The losses the phases of ``schedule`` name, bound to ``spec`` (PKT's ``pkt_variant``)."""
    return {p.loss: WARMUP_LOSSES.get(p.loss).bind(spec) for p in schedule}


def build_warmup(spec: WarmupSpec, source: nn.Module, student: nn.Module, input_shape: tuple[int, ...],
                 pruned_bn: str | None = None, pairs: TapPairs | None = None) -> InDistillWarmup:
    """Pair the taps, build the schedule and prune ``source`` (teacher or auxiliary) to the student's widths.

    ``pairs`` is the arm's :class:`~indistill.pairing.TapPairs` (the KD method reads the same); without it
    they are made here from ``spec.pairs`` / ``spec.resize`` (:func:`~indistill.pairing.pair_taps`).
    ``pruned_bn`` (an arm's resolved choice) wins over ``spec.pruned_bn`` and ``spec.reference``'s default.
    """
    from .config import REFERENCES

    bn = pruned_bn or spec.pruned_bn or REFERENCES[spec.reference]["pruned_bn"]
    if "embedding" not in model_taps(source) and spec.embedding_epochs:
        raise UserError("the warmup's embedding phase needs an 'embedding' tap on the teacher; name it in its taps")
    if pairs is None:
        pairs = pair_taps(source, student, input_shape, pairs=spec.pairs, resize=spec.resize)
    schedule = warmup_schedule(spec, student, pairs)
    used = {p.tap for p in schedule}
    distilled = pairs.restricted([s for s in pairs.student_taps if s in used])
    distilled.check_prunable()  # once, with the pairing's own words, before the pruning's dry forwards
    pruned = prune_to_student(
        source, student, dict(distilled), importance=spec.importance,
        producers=spec.producers or None, input_shape=input_shape, resize=spec.resize, bn=bn,
    )
    return InDistillWarmup(pruned, schedule, warmup_losses(spec, schedule))
