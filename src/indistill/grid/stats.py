"""The statistics of a grid: which arms are compared, per-arm description over seeds, and the paired
difference of a warmup arm to its base (mean, t confidence interval, seeds won, detectable difference).

Pure functions of the cells' evaluation dicts: nothing here reads a directory or draws anything.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from ..config import ArmSpec
from ..evaluate import summarised_results


class _Headline(Mapping[str, str]):
    """Top-1, then what :func:`~indistill.evaluate.summarised_results` names, read from the metric
    registries on each use: a retrieval metric a plug-in registers after this module loaded is summarised too."""

    def _columns(self) -> dict[str, str]:
        return {"top1": "top-1", **summarised_results()}

    def __getitem__(self, key: str) -> str:
        return self._columns()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._columns())

    def __len__(self) -> int:
        return len(self._columns())


#: the metrics a grid summarises (key in a model's results -> label), in their column order
HEADLINE: Mapping[str, str] = _Headline()


#: the power behind the "detectable difference" of a paired comparison
POWER = 0.8


def pairs_of(arms: list[ArmSpec]) -> dict[str, str]:
    """``{"indistill_M": "M"}``: every warmup arm and its first baseline (see :func:`comparisons`)."""
    out: dict[str, str] = {}
    for _key, warm, base in comparisons(arms):
        out.setdefault(warm, base)
    return out


def comparisons(arms: list[ArmSpec]) -> list[tuple[str, str, str]]:
    """``(key, warmup arm, baseline arm)`` for every paired comparison a grid reports.

    A warmup arm is compared with the arms its ``baseline`` names or, without one, the first arm with
    the same method and params but no warmup. An arm without a warmup is compared only with the arms its
    ``baseline`` names (e.g. PKT with a new Adam every epoch against plain PKT). The key is the arm's name,
    or ``"<arm> vs <base>"`` for each baseline of an arm that names several.
    """
    out = []
    for a in arms:
        if a.warmup != "indistill" and not a.baseline:
            continue
        bases = list(a.baseline or [])
        if not bases:
            bases = [b.name for b in arms if b.warmup == "none" and b.method == a.method
                     and (b.params or {}) == (a.params or {})][:1]
        for base in bases:
            out.append((a.name if len(bases) == 1 else f"{a.name} vs {base}", a.name, base))
    return out


def describe(values: list[float]) -> dict[str, float]:
    """Mean, sample std, min, max."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values)}


def paired(diffs: list[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean paired difference with its two-sided t confidence interval, and the seeds it won."""
    from scipy import stats

    d = describe(diffs)
    n = d["n"]
    if n > 1:
        t_ci = float(stats.t.ppf(0.5 + confidence / 2, n - 1))
        half = t_ci * d["std"] / math.sqrt(n)
        # The smallest true difference this many seeds detect 80% of the time (two-sided, at the CI's level),
        # if the paired sd is what this grid measured: what a grid that "found nothing" could have found.
        mde = (t_ci + float(stats.t.ppf(POWER, n - 1))) * d["std"] / math.sqrt(n)
    else:
        half = mde = float("nan")
    return {**d, "ci_low": d["mean"] - half, "ci_high": d["mean"] + half, "ci_half": half, "mde80": mde,
            "wins": sum(x > 0 for x in diffs), "losses": sum(x < 0 for x in diffs), "confidence": confidence}


def summarise(results: dict[int, dict[str, dict[str, Any]]], arms: list[ArmSpec]) -> dict[str, Any]:
    """``results[seed][arm]`` = the arm's evaluation dict -> per-arm stats and paired differences."""
    seeds = sorted(results)
    metrics = [m for m in HEADLINE if any(m in results[s].get(a.name, {}) for s in seeds for a in arms)]
    return {"seeds": seeds, "metrics": metrics, "arms": _per_arm(results, arms, seeds, metrics),
            "paired": _paired_differences(results, arms, seeds, metrics)}


def _per_arm(results: dict[int, dict[str, dict[str, Any]]], arms: list[ArmSpec], seeds: list[int],
             metrics: list[str]) -> dict[str, Any]:
    """Per arm and metric: :func:`describe` of the seeds where the arm has that metric, and the values."""
    per_arm: dict[str, Any] = {}
    for a in arms:
        per_arm[a.name] = {}
        for m in metrics:
            vals = [float(results[s][a.name][m]) for s in seeds if a.name in results[s] and m in results[s][a.name]]
            if vals:
                per_arm[a.name][m] = {**describe(vals), "values": vals}
    return per_arm


def _paired_differences(results: dict[int, dict[str, dict[str, Any]]], arms: list[ArmSpec], seeds: list[int],
                        metrics: list[str]) -> dict[str, Any]:
    """Per comparison (:func:`comparisons`) with a seed where both arms finished: :func:`paired` per metric."""
    diffs: dict[str, Any] = {}
    for key, warm, base in comparisons(arms):
        both = [s for s in seeds if warm in results[s] and base in results[s]]
        if not both:
            continue
        diffs[key] = {"arm": warm, "baseline": base, "seeds": both, "metrics": {}}
        for m in metrics:
            d = [float(results[s][warm][m]) - float(results[s][base][m]) for s in both
                 if m in results[s][warm] and m in results[s][base]]
            if d:
                diffs[key]["metrics"][m] = {**paired(d), "values": d}
    return diffs
