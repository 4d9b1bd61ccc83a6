"""The InDistill warmup as one object: the pruned source, the curriculum and the per-phase loss.

:func:`build_warmup` is the one factory that ``indistill run``, ``indistill
validate`` and ``indistill prune`` all call, so the channels ``prune`` shows are
the ones a run distils from. :class:`InDistillWarmup` is shaped like a KD
method: ``forward(student_feats, batch, epoch)`` returns named loss terms for
the phase active in that (0-based, arm-relative) epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
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
from .pairing import pair_stage_taps, stage_taps
from .prune import PrunedTeacher, prune_to_student, resize_map


class InDistillWarmup(nn.Module):
    """The curriculum over a pruned source: exactly one tap's loss per epoch, shallow to deep."""

    def __init__(self, pruned: PrunedTeacher, schedule: Schedule):
        super().__init__()
        self.pruned = pruned
        self.schedule = schedule

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
        key = phase.tap if phase.loss == "mse" else "embedding"
        with torch.no_grad():
            target = self.target(batch.images, key)
        s = student[phase.tap]
        if phase.loss == "mse":
            return {f"mse/{phase.tap}": F.mse_loss(s.flatten(1), target.flatten(1))}
        variant = "original" if phase.loss == "pkt_original" else "reference"
        return {f"pkt/{phase.tap}": pkt_loss(s, target, variant=variant)}

    @torch.no_grad()
    def target(self, x: torch.Tensor, key: str) -> torch.Tensor:
        """``self.pruned(x)[key]``, running the frozen source only as far as that one tap.

        A phase reads one target, so the source's forward stops where that tap is captured (a stage1
        phase runs only the source's first block). The selection is ``PrunedTeacher.targets_from``'s
        (the kept channels, then the optional resize), applied to that one tap; the result is the
        same tensor, bit for bit (``tests/test_perf_equivalence.py``).
        """
        pruned = self.pruned
        pruned.teacher.eval()
        t = next((t for t, s in pruned.pairs.items() if s == key), None)
        if t is None:  # an unpaired embedding/logits tap passes through unpruned
            if key not in pruned.tap_specs:
                raise UserError(f"the warmup's source has no '{key}' tap; name it in its taps")
            with Taps(pruned.teacher, {key: pruned.tap_specs[key]}) as taps:
                return taps.capture(x)[key]
        with Taps(pruned.teacher, {t: pruned.tap_specs[t]}) as taps:
            f = taps.capture(x)[t]
        if t in pruned._pruned:
            f = f.index_select(1, pruned.kept[t].to(f.device))
        return resize_map(f, pruned.shapes[t][1][1:], pruned.resize)  # the same selection as targets_from


def warmup_schedule(spec: WarmupSpec, student: nn.Module, pairs: dict[str, str]) -> Schedule:
    """The curriculum of ``spec`` over the student taps paired in ``pairs`` (student order)."""
    taps = spec.taps or [s for s in stage_taps(student) if s in pairs.values()]
    missing = [t for t in taps if t not in pairs.values()]
    if missing:
        raise UserError(f"warmup.taps {missing} have no teacher tap paired in warmup.pairs; pair them or drop them")
    return default_schedule(
        taps, a=spec.a, phase_epochs=spec.phase_epochs, tap_loss=spec.tap_loss,
        embedding_loss=spec.embedding_loss, embedding_epochs=spec.embedding_epochs,
    )


def build_warmup(spec: WarmupSpec, source: nn.Module, student: nn.Module, input_shape: tuple[int, ...]) -> InDistillWarmup:
    """Pair the taps, build the schedule and prune ``source`` (teacher or auxiliary) to the student's widths."""
    if "embedding" not in model_taps(source) and spec.embedding_epochs:
        raise UserError("the warmup's embedding phase needs an 'embedding' tap on the teacher; name it in its taps")
    pairs = pair_stage_taps(source, student, spec.pairs)
    schedule = warmup_schedule(spec, student, pairs)
    used = {p.tap for p in schedule}
    pruned = prune_to_student(
        source, student, {t: s for t, s in pairs.items() if s in used}, importance=spec.importance,
        producers=spec.producers or None, input_shape=input_shape, resize=spec.resize,
    )
    return InDistillWarmup(pruned, schedule)
