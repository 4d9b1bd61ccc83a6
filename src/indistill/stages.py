"""Stage builders: each returns an :class:`~indistill.engine.Stage`; the pipeline only orders them.

- :func:`supervised_stage`: cross-entropy training (the teacher, the auxiliary's first stage);
- :func:`auxiliary_pkt_stage`: the auxiliary learns the teacher's embedding with PKT;
- :func:`arm_stage`: one student arm, ONE stage: the InDistill warmup (if any) occupies its first
  epochs and the KD method the rest, under one optimizer and one learning-rate schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import OPTIMIZER_RESETS, ArmSpec, ModelSpec, TrainSpec, WarmupSpec
from .data import DataSplits
from .engine import Stage, derive_seed
from .errors import UserError
from .methods import Method, MethodContext, create_method, get_method_class, pkt_loss
from .models import Taps, model_taps, tap_shapes
from .pairing import TapPairs, pair_taps
from .warmup import InDistillWarmup


def model_meta(spec: ModelSpec, data: DataSplits, role: str, **extra: Any) -> dict[str, Any]:
    """What a checkpoint must know to be rebuilt and evaluated without retyping the config."""
    return {
        "role": role, "arch": spec.name, "kwargs": dict(spec.kwargs),
        "taps": spec.taps if isinstance(spec.taps, str) else dict(spec.taps or {}),  # a mapping, or "auto"
        "dataset": data.name, "num_classes": data.num_classes, "in_channels": data.in_channels,
        "image_size": data.image_size, **extra,
    }


def top1_evaluator(model: nn.Module, data: DataSplits, device: torch.device, batch_size: int) -> Callable[[int], dict[str, float]]:
    """``fn(epoch)`` -> ``{"test_top1": ...}`` on the test split (the per-epoch curve in the logs)."""

    def fn(_epoch: int) -> dict[str, float]:
        from .evaluate import classification_metrics, extract_features

        feats = extract_features(model, model_taps(model), data.test, device=device,
                                 batch_size=batch_size)
        m = classification_metrics(feats["logits"], feats["labels"])
        return {f"test_{k}": float(v) for k, v in m.items()}

    return fn


@dataclass
class HookedStage(Stage):
    """A stage whose forward hooks are removed by :meth:`close` once it has run."""

    hooks: tuple[Taps, ...] = ()

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def supervised_stage(name: str, model: nn.Module, train: TrainSpec, *, evaluate=None, meta=None) -> Stage:
    """Cross-entropy on the labels."""

    def loss_fn(batch, _epoch):
        return {"ce": F.cross_entropy(model(batch.images), batch.labels)}

    return Stage(name, model, loss_fn, train, evaluate=evaluate, meta=dict(meta or {}))


def auxiliary_pkt_stage(aux: nn.Module, teacher: nn.Module, train: TrainSpec, *, variant: str = "reference",
                        evaluate=None, meta=None) -> Stage:
    """Stage 0's second half: the auxiliary matches the teacher's embedding by PKT (no labels)."""
    t_taps = Taps(teacher, {"embedding": model_taps(teacher)["embedding"]})
    a_taps = Taps(aux, {"embedding": model_taps(aux)["embedding"]})

    def loss_fn(batch, _epoch):
        with torch.no_grad():
            _, t = t_taps(batch.images)
        _, a = a_taps(batch.images)
        return {"pkt": pkt_loss(a["embedding"], t["embedding"], variant=variant)}

    return HookedStage("auxiliary_pkt", aux, loss_fn, train, frozen=[teacher], evaluate=evaluate,
                       meta=dict(meta or {}), hooks=(t_taps, a_taps))


def method_taps(cls: type[Method], source: nn.Module, student: nn.Module,
                pairs: TapPairs | dict[str, str] | None, input_shape: tuple[int, ...] | None = None
                ) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """The teacher and student tap specs ``cls.uses`` reads (only those), and the paired stage taps.

    ``pairs`` is the arm's :class:`~indistill.pairing.TapPairs` (the warmup's too); explicit pairs or None
    are paired here (:func:`~indistill.pairing.pair_taps`, which needs ``input_shape``).
    """
    t_specs, s_specs = model_taps(source), model_taps(student)
    t_want: dict[str, str] = {}
    s_want: dict[str, str] = {}
    stages: list[str] = []
    if "stages" in cls.uses:
        if not isinstance(pairs, TapPairs):
            if input_shape is None:
                raise ValueError("method_taps needs input_shape to pair stage taps")
            pairs = pair_taps(source, student, input_shape, pairs=pairs)
        t_want.update({s: t_specs[t] for t, s in pairs.items()})
        s_want.update({s: s_specs[s] for s in pairs.values()})
        stages = pairs.student_taps
    for k in ("embedding", "logits"):
        if k in cls.uses:
            for role, specs in (("teacher", t_specs), ("student", s_specs)):
                if k not in specs:
                    raise UserError(f"method '{cls.name}' reads the '{k}' tap, which the {role} lacks; name it in its taps")
            t_want[k], s_want[k] = t_specs[k], s_specs[k]
    if not cls.needs_teacher:
        t_want = {}
    return t_want, s_want, stages


def build_method(arm: ArmSpec, source: nn.Module, student: nn.Module, *, pairs: TapPairs | dict[str, str] | None,
                 input_shape: tuple[int, ...], data: DataSplits, epochs: int, seed: int, stage_name: str
                 ) -> tuple[Method, dict[str, str], dict[str, str]]:
    """The arm's KD method, its trainable extras initialised from a generator of (seed, stage name)."""
    cls = get_method_class(arm.method or "")
    t_want, s_want, stages = method_taps(cls, source, student, pairs, input_shape)
    ctx = MethodContext(
        student_shapes=tap_shapes(student, s_want, input_shape) if s_want else {},
        teacher_shapes=tap_shapes(source, t_want, input_shape) if t_want else {},
        num_classes=data.num_classes, num_samples=len(data.train), stage_taps=stages, epochs=epochs,
    )
    # Draws here (regressors, heads) must not depend on whether earlier stages ran in this process.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, f"{stage_name}/method"))
        method = create_method(cls.name, ctx, arm.params or {})
    return method, t_want, s_want


def check_budget(arm: ArmSpec, warmup: InDistillWarmup | None, train: TrainSpec) -> None:
    if warmup is not None and warmup.epochs > train.epochs:
        raise UserError(
            f"arm '{arm.name}': the warmup takes {warmup.epochs} epochs ({warmup.schedule.describe()}) but the "
            f"student's budget is student.train.epochs={train.epochs}; raise it or shorten the warmup"
        )



def reset_epochs(mode: str, warmup: InDistillWarmup | None, epochs: int) -> tuple[int, ...]:
    """The 0-based epochs at whose start an arm's optimizer state is cleared (``student.optimizer_reset``).

    ``none``: never; ``boundary``: where the warmup hands over to the KD method; ``phase``: wherever the
    loss changes (every later curriculum phase, and the boundary); ``epoch``: every epoch, as the
    authors' code creates a new Adam each epoch. Epoch 0 starts fresh in every mode.
    """
    if mode not in OPTIMIZER_RESETS:
        raise UserError(f"optimizer_reset '{mode}' is not one of {', '.join(OPTIMIZER_RESETS)}")
    W = warmup.epochs if warmup is not None else 0
    if mode == "epoch":
        return tuple(range(1, epochs))
    out: set[int] = set()
    if mode in ("boundary", "phase") and W:
        out.add(W)
    if mode == "phase" and warmup is not None:
        out.update(p.start for p in warmup.schedule if p.start > 0)
    return tuple(sorted(e for e in out if 0 < e < epochs))


def arm_stage(arm: ArmSpec, student: nn.Module, source: nn.Module, *, warmup: InDistillWarmup | None,
              method: Method, t_want: dict[str, str], s_want: dict[str, str], train: TrainSpec,
              optimizer_reset: str = "phase", warmup_spec: WarmupSpec | None = None, evaluate=None,
              meta=None, pairs: TapPairs | None = None) -> HookedStage:
    """One student arm as ONE stage: epochs ``[0, W)`` run the warmup, ``[W, E)`` the KD method; the
    optimizer's state is cleared at :func:`reset_epochs` (the learning-rate schedule never is)."""
    check_budget(arm, warmup, train)
    W = warmup.epochs if warmup is not None else 0
    s_specs = model_taps(student)
    wanted = dict(s_want)
    if warmup is not None:
        wanted.update({t: s_specs[t] for t in warmup.student_taps})
    s_taps = Taps(student, wanted)
    t_taps = Taps(source, t_want) if t_want else None

    def loss_fn(batch, epoch):
        _, s = s_taps(batch.images)
        if epoch < W:
            return warmup(s, batch, epoch)
        t: dict[str, torch.Tensor] = {}
        if t_taps is not None:
            with torch.no_grad():
                _, t = t_taps(batch.images)
        return method(s, t, batch, epoch - W)

    def phase(epoch):
        return f"warmup:{warmup.phase_name(epoch)}" if epoch < W else f"kd:{method.name}"

    eval_warm = bool(warmup_spec.evaluate) if warmup_spec is not None else False
    frozen = [source] + ([warmup.pruned] if warmup is not None else [])
    return HookedStage(
        arm.name, student, loss_fn, train, extra=method, frozen=frozen, phase=phase, evaluate=evaluate,
        eval_epochs=(lambda e: e >= W or eval_warm), reset_optimizer_at=reset_epochs(optimizer_reset, warmup, train.epochs),
        meta=dict(meta or {}), hooks=tuple(h for h in (s_taps, t_taps) if h is not None), warmup=warmup,
        pairs=pairs,
    )
