"""The InDistill warmup schedule: one tap at a time, shallow to deep.

Phase k (1-based) distils intermediate tap k with the tap loss (MSE by default) for ``a + k`` epochs
(``warmup.a``; or ``warmup.phase_epochs[k-1]``): deeper = harder = longer. An optional last phase distils
the embedding with the embedding loss (PKT by default) for ``warmup.embedding_epochs`` epochs (or, through
the API, the rest of ``total_epochs``). The warmup lasts the sum of its phases; the arm's KD method trains
the rest of ``student.train.epochs``. Exactly one loss is active in any epoch; losses are never summed
across taps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class Phase:
    """One tap's stretch of the warmup."""

    tap: str  # student tap name
    loss: str  # a name in warmup.WARMUP_LOSSES (PKT's variant is warmup.pkt_variant, not a loss name)
    epochs: int
    start: int  # first epoch (0-based) of the phase


class Schedule:
    """An ordered list of phases covering epochs ``0 .. total-1``."""

    def __init__(self, phases: Sequence[tuple[str, str, int]]):
        if not phases:
            raise UserError("the warmup schedule has no phases; give warmup.taps or set warmup=none")
        out, start = [], 0
        for tap, loss, epochs in phases:
            if epochs < 1:
                raise UserError(f"warmup phase on '{tap}' has {epochs} epochs; every phase needs at least 1")
            out.append(Phase(tap, loss, int(epochs), start))
            start += int(epochs)
        self.phases: list[Phase] = out
        self.total = start

    def phase_at(self, epoch: int) -> Phase:
        """The phase active in 0-based ``epoch``."""
        for p in self.phases:
            if p.start <= epoch < p.start + p.epochs:
                return p
        raise IndexError(f"epoch {epoch} is outside the warmup ({self.total} epochs)")

    def describe(self) -> str:
        return " -> ".join(f"{p.tap}:{p.loss}x{p.epochs}" for p in self.phases)

    def __iter__(self):
        return iter(self.phases)

    def __len__(self) -> int:
        return len(self.phases)


def default_schedule(
    taps: Sequence[str],
    *,
    a: int = 2,
    total_epochs: int | None = None,
    phase_epochs: Sequence[int] | None = None,
    tap_loss: str = "mse",
    embedding_tap: str = "embedding",
    embedding_loss: str | None = "pkt",
    embedding_epochs: int | None = None,
) -> Schedule:
    """The default of docs/spec.md: ``taps[k-1]`` with ``tap_loss`` for ``a + k`` epochs, then the embedding
    with ``embedding_loss`` for ``embedding_epochs`` epochs, or (given ``total_epochs`` instead) for
    ``total_epochs - sum(...)`` epochs; no embedding phase if that is 0 or the loss is None."""
    if phase_epochs is not None:
        if len(phase_epochs) != len(taps):
            raise UserError(
                f"warmup.phase_epochs has {len(phase_epochs)} entries for {len(taps)} taps ({', '.join(taps)}); "
                f"give one per tap"
            )
        epochs = [int(e) for e in phase_epochs]
    else:
        epochs = [a + k for k in range(1, len(taps) + 1)]
    phases: list[tuple[str, str, int]] = [(t, tap_loss, e) for t, e in zip(taps, epochs)]
    used = sum(epochs)
    if embedding_epochs is not None:
        if embedding_epochs < 0:
            raise UserError(f"warmup.embedding_epochs={embedding_epochs} is negative; use 0 or more")
        if embedding_epochs and embedding_loss not in (None, "none"):
            phases.append((embedding_tap, embedding_loss, int(embedding_epochs)))
        return Schedule(phases)
    if total_epochs is not None and embedding_loss not in (None, "none"):
        rest = total_epochs - used
        if rest < 0:
            raise UserError(
                f"total_epochs={total_epochs} is shorter than its tap phases ({used} epochs: "
                f"{' + '.join(map(str, epochs))}); raise total_epochs or lower a"
            )
        if rest > 0:
            phases.append((embedding_tap, embedding_loss, rest))
    return Schedule(phases)
