"""Typed configuration: dataclass schema, YAML loading, ``key=value`` overrides.

Every key is validated: a typo is a one-line ``UserError`` that names the key,
the closest valid keys and the file it came from.

Each field carries its own constraints, declared once beside it and read by the checks, by
``indistill schema`` (docs/config.md) and by the error messages alike:

- a fixed vocabulary is the field's type, ``Literal[...]`` (the vocabularies below are defined once
  here and imported where they are used: ``PRECISIONS``, ``RETRIEVAL_METRICS``, ``PROTOCOLS``, ...);
- a name looked up in a registry (methods, datasets, optimizers, schedulers, warmup losses and
  schedules, rank metrics; plug-ins add to them) is ``opt(..., registry=KIND)``;
- a numeric range is ``opt(..., ge=/gt=/le=/lt=)``, checked item by item for lists;
- anything else (plain file names, tap specs) is ``opt(..., check=function)``;
- the help text is ``opt(..., help=...)``.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import UserError, brief, clip, suggest

# ------------------------------------------------------------------------------------------ vocabularies
# One vocabulary per concept: the Literal is the field's type, the tuple is what other modules import.

Precision = Literal["auto", "fp32", "bf16", "fp16"]
WarmupMode = Literal["indistill", "none"]
Reference = Literal["described", "authors"]
OptimizerReset = Literal["none", "boundary", "phase", "epoch"]
PrunedBN = Literal["teacher", "authors"]
Importance = Literal["l1", "group"]
Resize = Literal["avgpool", "bilinear"]
PktVariant = Literal["reference", "original"]
RetrievalMetric = Literal["cosine", "euclidean"]
Protocol = Literal["standard", "reference"]

#: autocast precisions (``precision``, ``*.train.precision``); ``auto``: bf16 where native, else fp32
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
#: ``warmup.mode`` / an arm's ``warmup``
WARMUP_MODES: tuple[str, ...] = typing.get_args(WarmupMode)
#: ``warmup.reference``: which reading of the choices the paper leaves open (see ``REFERENCES``)
REFERENCE_MODES: tuple[str, ...] = typing.get_args(Reference)
#: ``student.optimizer_reset``: when an arm's optimizer state is cleared (``stages.reset_epochs``)
OPTIMIZER_RESETS: tuple[str, ...] = typing.get_args(OptimizerReset)
#: ``warmup.pruned_bn``: the BatchNorm of a pruned tap (``prune.PrunedTeacher``)
PRUNED_BN_MODES: tuple[str, ...] = typing.get_args(PrunedBN)
#: ``warmup.importance``: how filters are ranked for pruning
IMPORTANCE_MODES: tuple[str, ...] = typing.get_args(Importance)
#: ``warmup.resize``: None (spatial sizes must match) or how a teacher map is resized to the student's
RESIZE_MODES: tuple[str | None, ...] = (None, *typing.get_args(Resize))
#: PKT's variants: ``auxiliary.pkt_variant``, ``warmup.pkt_variant`` and the PKT method's ``variant``
PKT_VARIANTS: tuple[str, ...] = typing.get_args(PktVariant)
#: retrieval similarities (``evaluate.metrics``)
RETRIEVAL_METRICS: tuple[str, ...] = typing.get_args(RetrievalMetric)
#: retrieval protocols (``evaluate.protocols``): standard metrics and the authors' evaluation
PROTOCOLS: tuple[str, ...] = typing.get_args(Protocol)

#: what ``warmup.reference`` sets where ``optimizer_reset`` / ``pruned_bn`` are left unset
REFERENCES: dict[str, dict[str, str]] = {
    "described": {"optimizer_reset": "phase", "pruned_bn": "teacher"},
    "authors": {"optimizer_reset": "epoch", "pruned_bn": "authors"},
}
assert tuple(REFERENCES) == REFERENCE_MODES

# ------------------------------------------------------------------------------------ field constraints


class _Range(typing.NamedTuple):
    """Valid numbers: ``lo <= v`` (``lo < v`` when not ``lo_incl``), likewise ``hi``; None: unbounded."""

    lo: float | None = None
    lo_incl: bool = True
    hi: float | None = None
    hi_incl: bool = True

    def admits(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.lo is not None and (v < self.lo or (v == self.lo and not self.lo_incl)):
            return False
        return not (self.hi is not None and (v > self.hi or (v == self.hi and not self.hi_incl)))

    def __str__(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        parts = []
        if self.lo is not None:
            parts.append(f"{'>=' if self.lo_incl else '>'} {num(self.lo)}")
        if self.hi is not None:
            parts.append(f"{'<=' if self.hi_incl else '<'} {num(self.hi)}")
        return " and ".join(parts)


#: registry kinds a field may name (``opt(registry=...)``) -> (module, attribute), imported when first checked
REGISTRIES: dict[str, tuple[str, str]] = {
    "method": ("methods.base", "METHODS"),
    "dataset": ("data.base", "DATASETS"),
    "optimizer": ("optim", "OPTIMIZERS"),
    "scheduler": ("optim", "SCHEDULERS"),
    "warmup loss": ("warmup", "WARMUP_LOSSES"),
    "warmup schedule": ("warmup", "WARMUP_SCHEDULES"),
    "rank metric": ("evaluate", "RANK_METRICS"),
}


def registry_of(kind: str) -> Any:
    """The :class:`~indistill.registry.Registry` of ``kind`` (a key of ``REGISTRIES``)."""
    module, attr = REGISTRIES[kind]
    return getattr(importlib.import_module(f".{module}", __package__), attr)


def opt(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None, help: str = "",
        ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
        registry: str | None = None, check: Callable[[Any, str], None] | None = None,
        omit_default: bool = False) -> Any:
    """A config field with its constraints beside it (see the module doc).

    ``ge``/``gt``/``le``/``lt`` bound a number (each item of a list); ``registry`` names the registry
    (``REGISTRIES``) a name must resolve in; ``check(value, where)`` raises a ``UserError`` for anything
    else; ``omit_default``: a written config leaves the field out while it holds its default.
    """
    if ge is not None and gt is not None or le is not None and lt is not None:
        raise ValueError("give ge or gt, le or lt, not both")
    if registry is not None and registry not in REGISTRIES:
        raise ValueError(f"unknown registry kind {registry!r}")
    meta: dict[str, Any] = {"help": help}
    if any(b is not None for b in (ge, gt, le, lt)):
        meta["range"] = _Range(ge if ge is not None else gt, gt is None, le if le is not None else lt, lt is None)
    if registry is not None:
        meta["registry"] = registry
    if check is not None:
        meta["check"] = check
    if omit_default:
        meta["omit_default"] = True
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# A path component holds at most 255 bytes (NAME_MAX of ext4, xfs, btrfs, tmpfs, ...). The longest file name a
# plain name becomes is the temp file of an arm's export, `.<name>.safetensors.<8 random chars>.tmp` (mkstemp in
# checkpoint._atomic_write_bytes): 26 bytes more than the name. One limit for run and arm names.
NAME_MAX_BYTES = 255 - len("..safetensors.XXXXXXXX.tmp")


def _check_plain_name(value: str, where: str) -> None:
    """A single path component: no separators, no '..', no leading '.', not empty, at most ``NAME_MAX_BYTES`` bytes."""
    try:
        size = len(os.fsencode(value))  # bytes on disk (surrogateescape: a non-UTF-8 argv round-trips)
    except UnicodeEncodeError:  # a lone surrogate from a YAML escape: no file can have this name
        raise UserError(f"{where}: {brief(value)} is not a valid file name (an unpaired surrogate); use another name") from None
    if size > NAME_MAX_BYTES:
        raise UserError(
            f"{where}: {brief(value)} is {size} bytes long; a name becomes file names and may have at most "
            f"{NAME_MAX_BYTES} bytes (the filesystem's 255 less the checkpoint writer's temp-file suffix); use a shorter name"
        )
    bad = (
        not value.strip()
        or "/" in value
        or "\\" in value
        or ".." in value
        or value.startswith(".")
        or any(ord(c) < 32 for c in value)
    )
    if bad:
        raise UserError(
            f"{where}: {brief(value)} is not a plain name (it becomes a directory/file name); "
            "use letters, digits, '-', '_' and inner '.', without '/', '\\' or '..'"
        )


def _check_taps(value: Any, where: str) -> None:
    """``taps``: a mapping, or the one word ``auto``."""
    if isinstance(value, str) and value != "auto":
        raise UserError(f"{where}: {brief(value)} is neither auto nor a mapping of tap name -> module path")


# ------------------------------------------------------------------------------------------------ schema

_MODEL_NAME = "a zoo model (`indistill models`), timm:<model>, torchvision:<model> or module.path:factory"


@dataclass
class OptimizerSpec:
    """The optimizer of one stage (one per student arm)."""

    name: str = opt("adam", registry="optimizer",
                    help="adam, adamw, sgd, or any torch.optim class by name (rmsprop, nadam, ...)")
    lr: float = opt(1e-3, gt=0, help="learning rate")
    weight_decay: float = opt(0.0, ge=0, help="L2 penalty")
    momentum: float = opt(0.9, ge=0, lt=1, help="SGD only")
    nesterov: bool = opt(False, help="SGD only")
    kwargs: dict[str, Any] = opt(factory=dict, help="more keyword arguments of the optimizer (betas, eps, ...)")


@dataclass
class SchedulerSpec:
    """The learning-rate schedule, stepped once per epoch over the stage's epochs (an arm's whole budget)."""

    name: str = opt("none", registry="scheduler",
                    help="none, multistep, cosine, or any torch.optim.lr_scheduler class by name (exponential, ...)")
    milestones: list[int] = opt(factory=list, ge=1, help="multistep: epochs after which lr *= gamma")
    gamma: float = opt(0.1, gt=0, le=1, help="multistep: the factor")
    kwargs: dict[str, Any] = opt(factory=dict, help="a torch scheduler's keyword arguments (gamma, step_size, ...)")


@dataclass
class TrainSpec:
    """How one stage trains: epochs, optimiser and learning-rate schedule."""

    epochs: int = opt(10, ge=1, help="epochs of the stage (a student arm: its whole budget)")
    optimizer: OptimizerSpec = opt(factory=OptimizerSpec, help="see below")
    scheduler: SchedulerSpec = opt(factory=SchedulerSpec, help="see below")
    eval_every: int = opt(1, ge=0, help="test top-1 every N epochs (0: never)")
    precision: Precision | None = opt(None, help="this stage's autocast; null: the run's `precision`")


@dataclass
class DataSpec:
    """The dataset (`indistill datasets` lists them) and how it is batched."""

    name: str = opt("digits", registry="dataset", help="a registered dataset: digits, fashion_mnist, cifar10, "
                                                      "cifar100, imagenet, imagefolder, or a plug-in's")
    root: str | None = opt(None, help="the folder to read; when set, the only place searched")
    download: bool = opt(False, help="allow torchvision to download (never by default)")
    batch_size: int = opt(128, ge=1, help="training batch (global, across processes)")
    eval_batch_size: int = opt(512, ge=1, help="feature extraction batch")
    train_subset: int | None = opt(None, ge=1, help="a seeded, class-stratified subset of the training split")
    test_subset: int | None = opt(None, ge=1, help="the same for the test split")
    num_workers: int = opt(2, ge=0, help="only for datasets read from files per batch (ImageFolder)")
    kwargs: dict[str, Any] = opt(factory=dict, help="the dataset's own options (e.g. digits: {image_size: 16})")


@dataclass
class ModelSpec:
    """A zoo model by name, ``timm:<model>`` / ``torchvision:<model>``, or a user model as ``module.path:factory``.

    ``taps`` overrides or supplies tap specs (name -> module path, ``path:in``, or ``@output``); a model
    without registered taps has them found at the data's input size (``taps: auto``, the default for it).
    """

    name: str = opt("cnn32_small", help=_MODEL_NAME)
    kwargs: dict[str, Any] = opt(factory=dict, help="passed to the model's factory")
    taps: dict[str, str] | str | None = opt(None, check=_check_taps, help=(
        "tap name -> module path / path:in / @output; auto: found by a dry forward (the default without "
        "registered taps)"))
    checkpoint: str | None = opt(None, help="load trained weights from here instead of training")
    reset_head: bool = opt(False, help="with checkpoint: keep the fresh classifier when the class counts differ")


@dataclass
class TeacherSpec(ModelSpec):
    """The teacher: trained with cross-entropy here, or loaded from ``checkpoint``."""

    name: str = opt("cnn32", help=_MODEL_NAME)
    train: TrainSpec = opt(factory=lambda: TrainSpec(epochs=20), help="its cross-entropy training")


@dataclass
class AuxiliarySpec(ModelSpec):
    """Stage 0: the auxiliary is trained with cross-entropy, then taught by the teacher with PKT."""

    enabled: bool = opt(False, help="use an auxiliary between teacher and student")
    name: str = opt("cnn32", help=_MODEL_NAME)
    ce: TrainSpec = opt(factory=lambda: TrainSpec(epochs=20), help="its cross-entropy stage")
    pkt: TrainSpec = opt(factory=lambda: TrainSpec(epochs=20), help="then PKT from the teacher's embedding")
    pkt_variant: PktVariant = opt("reference", help="the PKT of that stage (as the PKT method's `variant`)")


@dataclass
class StudentSpec(ModelSpec):
    """The student, and the ONE budget every arm trains under.

    ``train.epochs`` is each arm's total: the warmup (if the arm has one) takes
    its first epochs and the KD method the rest, under one optimizer and one
    learning-rate schedule over absolute student epochs, identical for every arm.
    ``optimizer_reset`` says when the optimizer's state (Adam's moments) is
    cleared: ``none`` (one optimizer throughout), ``boundary`` (when the warmup
    hands over to the KD method), ``phase`` (whenever the loss changes: every
    curriculum phase and the boundary; the default of ``warmup.reference:
    described``) or ``epoch`` (every epoch, as the authors' code re-creates Adam;
    the default of ``warmup.reference: authors``, the default reference). The
    schedule is never reset.
    """

    checkpoint: str | None = opt(None, help="every arm starts from these weights (default: a fresh student "
                                            "initialised from seed)")
    train: TrainSpec = opt(factory=lambda: TrainSpec(epochs=25),
                           help="every arm's budget: warmup and KD method together")
    optimizer_reset: OptimizerReset | None = opt(None, help="when the optimizer's state is cleared; "
                                                            "null: warmup.reference's choice")


@dataclass
class WarmupSpec:
    """The InDistill curriculum every arm with ``warmup: indistill`` runs first (see docs/spec.md).

    Phase k (1-based) distils student tap ``taps[k-1]`` for ``a + k`` epochs
    (or ``phase_epochs[k-1]``) with ``tap_loss``; then, if ``embedding_epochs``
    > 0, the embedding with ``embedding_loss``. Its length is the sum of those:
    the KD method trains the rest of ``student.train.epochs``.
    """

    mode: WarmupMode = opt("indistill", help="the default of every arm that does not set `warmup`")
    taps: list[str] | None = opt(None, help="student stage taps, shallow to deep (default: all paired stage taps)")
    pairs: dict[str, str] | None = opt(None, help="teacher tap -> student tap (default: automatic, equal H x W "
                                                  "shallow to deep; see `indistill pair`)")
    a: int = opt(2, ge=0, help="phase k lasts a + k epochs")
    phase_epochs: list[int] | None = opt(None, ge=1, help="explicit epochs per tap phase (instead of a + k)")
    embedding_epochs: int = opt(0, ge=0, help="0: the KD method itself follows the tap phases (the reference)")
    schedule: str = opt("default", registry="warmup schedule",
                        help="a registered curriculum (warmup.WARMUP_SCHEDULES): default = the paper's a + k")
    tap_loss: str = opt("mse", registry="warmup loss",
                        help="the loss of the tap phases (a registered warmup loss: mse, pkt, or a plug-in's)")
    embedding_loss: str = opt("pkt", registry="warmup loss",
                              help="the loss of the embedding phase (a registered warmup loss)")
    pkt_variant: PktVariant = opt("reference", help="the PKT of the warmup's pkt phases (as the PKT method's "
                                                    "`variant`; formerly embedding_loss: pkt_original)")
    importance: Importance = opt("l1", help="filter ranking: L1 norm, or torch-pruning's coupled groups")
    producers: dict[str, str] = opt(factory=dict, help="teacher tap -> producing conv path")
    resize: Resize | None = opt(None, help="opt-in when spatial sizes differ (automatic pairs then go by depth)")
    evaluate: bool = opt(False, help="test top-1 during the warmup epochs too (student.train.eval_every)")
    # What the method description leaves open, as described (docs/spec.md, "Open choices") or as the authors' code does:
    # The default is the authors' code: it beat "described" by +0.59 [+0.34, +0.85] cosine mAP, 5 of 5 paired seeds
    # (docs/results/paper_fashion_mnist, docs/method.md "What each choice is worth").
    reference: Reference = opt("authors", help="the defaults of optimizer_reset and pruned_bn (docs/method.md)")
    pruned_bn: PrunedBN | None = opt(None, help="a pruned tap's BatchNorm: the teacher's own, or the authors' (batch "
                                                "statistics, gamma kept, beta 0); null: reference's choice")


@dataclass
class KDSpec:
    """Defaults of every arm: ``method`` for arms that name none; ``params`` keyed by method name
    (``params: {dkd: {beta: 8}, pkt: {variant: original}}``), so parameters belong to their method."""

    method: str = opt("pkt", registry="method", help="`indistill methods` lists them; ce = cross-entropy only")
    params: dict[str, dict[str, Any]] = opt(factory=dict, help="method name -> its parameters")


@dataclass
class ArmSpec:
    """One student variant trained from the same teacher (and auxiliary).

    Unset fields inherit the top-level defaults: ``warmup`` from ``warmup.mode``,
    ``method`` from ``kd.method``, ``params`` from ``kd.params[method]``.
    """

    name: str = opt("student", check=_check_plain_name, help="a plain name: the stage, checkpoint and export name")
    warmup: WarmupMode | None = opt(None, help="default: warmup.mode")
    method: str | None = opt(None, registry="method", help="any registered KD method, `ce` included "
                                                           "(default: kd.method)")
    params: dict[str, Any] | None = opt(None, help="this arm's method parameters (default: kd.params[method])")
    reference: Reference | None = opt(None, help="default: warmup.reference")
    optimizer_reset: OptimizerReset | None = opt(None, help="default: student.optimizer_reset")
    pruned_bn: PrunedBN | None = opt(None, help="default: warmup.pruned_bn")
    baseline: list[str] | None = opt(None, help="arms a grid pairs this one with (default: same method, no warmup)")


@dataclass
class LoggingSpec:
    """Optional loggers beside log.txt and metrics.jsonl."""

    tensorboard: bool = opt(False, help="also write TensorBoard events to <run>/tb (pip install 'indistill[tensorboard]')")


@dataclass
class EvalSpec:
    """Evaluation: top-1 on the test split and retrieval (database = train split, queries = test split)."""

    metrics: list[RetrievalMetric] = opt(factory=lambda: list(RETRIEVAL_METRICS), help="retrieval similarities")
    protocols: list[Protocol] = opt(factory=lambda: list(PROTOCOLS), help="standard metrics and/or the authors'")
    ks: list[int] = opt(factory=lambda: [1, 10, 100], ge=1, help="precision@k")
    extra_metrics: list[str] = opt(factory=list, registry="rank metric",
                                   help="more retrieval metrics by name: mrr, r_precision, a plug-in's")
    sources: bool = opt(True, help="also evaluate the teacher and auxiliary (a grid's cells evaluate only their student)")
    latency_repeats: int = opt(10, ge=0, help="deployment view: timed CPU forwards per batch size (1 and 64), "
                                              "median reported; 0: no latency")


@dataclass
class DistributedSpec:
    """Data-parallel runs under ``torchrun`` (ignored in one process)."""

    sync_bn: bool = opt(False, help="SyncBatchNorm over all ranks in the trained modules (CUDA only)")


@dataclass
class Config:
    """The whole run. ``indistill run`` uses teacher/auxiliary/student/warmup/kd/arms;
    ``indistill train`` uses ``model`` and ``train`` (``indistill evaluate`` a given ``model``).

    The student pipeline never reads ``model`` and ``train``: a written config (a run's
    ``config.yaml``) leaves them out while they hold their defaults, and reading it back restores them.
    """

    name: str = opt("run", check=_check_plain_name, help="the run's name: a plain directory name")
    out_dir: str = opt("runs", help="the run directory is out_dir/name")
    seed: int = opt(0, ge=0, le=2**32 - 1, help="model init, data order and augmentation; a grid's first seed "
                                                "(32-bit unsigned, as numpy's)")
    device: str = opt("auto", help="auto | cpu | cuda | cuda:N")
    precision: Precision = opt("auto", help="autocast: auto = bf16 where the device runs it natively, else fp32")
    channels_last: bool = opt(False, help="NHWC memory format (faster convs with AMP on GPUs)")
    progress: bool = opt(True, help="progress bars on a terminal")
    data: DataSpec = opt(factory=DataSpec, help="the dataset")
    model: ModelSpec = opt(factory=ModelSpec, omit_default=True, help=(
        "only `indistill train` (and `indistill evaluate` given model.*): the model it trains; left out of a "
        "written config while at its default"))
    # `indistill train` (a plain supervised run) defaults to Adam 2e-3 annealed by a cosine schedule (docs/config.md).
    train: TrainSpec = opt(factory=lambda: TrainSpec(optimizer=OptimizerSpec(lr=2e-3),
                                                     scheduler=SchedulerSpec(name="cosine")),
                           omit_default=True, help=(
        "only `indistill train`: its supervised training (default Adam 2e-3 + cosine); left out of a written "
        "config while at its default"))
    teacher: TeacherSpec = opt(factory=TeacherSpec, help="the teacher")
    auxiliary: AuxiliarySpec = opt(factory=AuxiliarySpec, help="the optional auxiliary teacher")
    student: StudentSpec = opt(factory=StudentSpec, help="the student and every arm's budget")
    warmup: WarmupSpec = opt(factory=WarmupSpec, help="the InDistill curriculum (arm default)")
    kd: KDSpec = opt(factory=KDSpec, help="the KD method (arm default) and per-method params")
    arms: list[ArmSpec] = opt(factory=list, help="student variants; default: one arm named student")
    evaluate: EvalSpec = opt(factory=EvalSpec, help="what is measured")
    logging: LoggingSpec = opt(factory=LoggingSpec, help="optional loggers")
    distributed: DistributedSpec = opt(factory=DistributedSpec, help="torchrun options")
    loss_guard: float = opt(1e4, ge=0, help=(
        "stop a stage whose epoch loss exceeds this x its phase's first epoch (an exploded but finite loss), "
        "keeping the last good checkpoint as a non-finite loss does; 0: off"))
    plugins: list[str] = opt(factory=list, help=(
        "modules imported before anything is built, so the methods, models, datasets, optimizers and warmup "
        "losses they register can be named here (e.g. [mypackage.kd])"))

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def _check_field(f: dataclasses.Field, value: Any, where: str) -> None:
    """The constraints in ``f.metadata`` (its type, ``Literal`` included, was checked by ``_coerce``)."""
    if value is None:
        return
    meta = f.metadata
    items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
    at = (lambda i: where if i is None else f"{where}[{i}]")
    if "check" in meta:
        meta["check"](value, where)
    if "registry" in meta:
        registry = registry_of(meta["registry"])
        for i, v in items:
            try:
                registry.get(v)
            except UserError as e:
                raise UserError(f"{at(i)}: {e}") from None
    rng = meta.get("range")
    if rng is not None:
        for i, v in items:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue  # the type check has already reported non-numbers
            if not rng.admits(v):
                raise UserError(f"{at(i)}: {brief(v)} is out of range; valid: {rng}")


def check_run_location(cfg: Config) -> None:
    """Fail early (one line) if the run directory ``out_dir/name`` cannot be created or written.

    Checks, creating nothing: ``out_dir`` and the run directory are directories
    if they exist, and the nearest existing parent of the run directory is a
    writable directory. Call it before the first write of a run.
    """
    out_dir = Path(cfg.out_dir).expanduser()
    run_dir = out_dir / cfg.name
    try:
        _probe_run_location(out_dir, run_dir)
    except OSError as e:  # a path too long for the system (ENAMETOOLONG), a loop of links, an unreadable parent
        raise UserError(f"cannot use run directory '{clip(str(run_dir))}': {e.strerror or e}; "
                        f"set out_dir=... and name=... to a shorter, accessible path") from None


def _probe_run_location(out_dir: Path, run_dir: Path) -> None:
    """:func:`check_run_location`'s checks; the file system's own errors propagate as ``OSError``."""
    for what, p in (("out_dir", out_dir), ("run directory", run_dir)):
        if p.is_symlink() and not p.exists():  # mkdir would fail on the link with FileExistsError
            raise UserError(f"{what} '{clip(str(p))}' is a symlink to '{clip(os.readlink(p))}', which does not exist; "
                            f"create its target or remove the link")
        if p.exists() and not p.is_dir():
            raise UserError(f"{what} '{clip(str(p))}' exists and is not a directory; set out_dir=... to a directory (or remove that file)")
    parent = run_dir
    while not parent.exists():
        if parent.parent == parent:
            break
        if parent.is_symlink():  # a dangling link above the run directory
            raise UserError(f"cannot create run directory '{clip(str(run_dir))}': '{clip(str(parent))}' is a symlink to "
                            f"'{clip(os.readlink(parent))}', which does not exist; create its target or remove the link")
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot create run directory '{clip(str(run_dir))}': '{clip(str(parent))}' is a file; set out_dir=... to a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot create run directory '{clip(str(run_dir))}': '{clip(str(parent))}' is not writable; set out_dir=... to a writable directory")


def choices_of(tp: Any) -> tuple[Any, ...] | None:
    """The values a ``Literal`` type (or an optional one: None first) admits; None for any other type."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if rest and all(typing.get_origin(a) is Literal for a in rest):
            values = tuple(v for a in rest for v in typing.get_args(a))
            return ((None,) if type(None) in args else ()) + values
    return None


def _not_one_of(value: Any, choices: tuple[Any, ...], where: str) -> UserError:
    """The one-line error of a value outside a field's vocabulary, with the closest words."""
    shown = ", ".join("null" if c is None else str(c) for c in choices)
    close = suggest(value, [str(c) for c in choices if c is not None]) if isinstance(value, str) else ""
    return UserError(f"{where}: {brief(value)} is not one of {shown}{close}")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check and convert ``value`` to annotation ``tp`` (dataclasses recursively)."""
    origin = typing.get_origin(tp)
    choices = choices_of(tp)
    if choices is not None:
        if any(value is c if c is None else (isinstance(value, str) and value == c) for c in choices):
            return value
        raise _not_one_of(value, choices, where)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: bad value {brief(value)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping of keys, got {brief(value)}")
        return from_dict(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {brief(value)}")
        return dict(value)
    return _coerce_scalar(tp, value, where)


def _coerce_scalar(tp: Any, value: Any, where: str) -> Any:
    """:func:`_coerce` for ``bool``, ``int``, ``float`` and ``str``; any other annotation passes ``value`` on."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true or false, got {brief(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected an integer, got {brief(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-3" as a string
            except ValueError:
                pass
        raise UserError(f"{where}: expected a number, got {brief(value)}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{where}: expected a string, got {brief(value)}")
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from a dict, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    specs = {f.name: f for f in dataclasses.fields(cls)}
    fields = set(specs)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise UserError(f"{where}: unknown key {brief(str(key))}{suggest(str(key)[:200], fields)}; valid keys: {', '.join(sorted(fields))}")
        sub = f"{where}.{key}"
        factory = specs[key].default_factory
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[key]) and factory is not dataclasses.MISSING:
            # A partial mapping fills in this field's own defaults (teacher.train has 20 epochs, a bare
            # TrainSpec 10), so leaving a key out of YAML means the same as leaving the whole block out.
            value = _merge(to_dict(factory()), value)
        kwargs[key] = _coerce(hints[key], value, sub)
        _check_field(specs[key], kwargs[key], sub)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A dataclass config as plain dicts/lists (for YAML/JSON)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value



class DuplicateKeyError(yaml.YAMLError):
    """A mapping names the same key twice (PyYAML would silently keep the last)."""

    def __init__(self, key: Any, line: int):
        super().__init__(f"duplicate key {brief(key, 60)} at line {line}")
        self.key, self.line = key, line


# libyaml's parser where PyYAML was built with it: 40x faster on a 10 MB value; the constructor is the same safe one.
class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """``yaml.SafeLoader`` that refuses duplicate mapping keys (merge keys ``<<`` may still be overridden)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise DuplicateKeyError(key, key_node.start_mark.line + 1)
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                pass
        return super().construct_mapping(node, deep=deep)


#: values a loaded YAML document may expand to; aliases make a 432-byte document reach 9**9 (a "billion laughs")
MAX_YAML_VALUES = 100_000


def _check_expansion(tree: Any, where: str) -> None:
    """Refuse a document whose aliases expand to more than ``MAX_YAML_VALUES`` values, counting without
    expanding: every later step (merging, ``to_dict``, dumping) would copy the whole expansion."""
    count, stack = 0, [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            count += len(node)
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            count += len(node)
            stack.extend(node)
        if count > MAX_YAML_VALUES:
            raise UserError(f"{where}: the YAML expands to more than {MAX_YAML_VALUES:,} values (through aliases); "
                            f"write the config out without nested aliases")


def load_yaml(text: str, where: str) -> Any:
    """Parse YAML safely: no code, no duplicate keys, a bounded expansion; errors name ``where``."""
    try:
        tree = yaml.load(text, Loader=_StrictLoader)  # noqa: S506  (a SafeLoader subclass)
    except DuplicateKeyError as e:
        raise UserError(f"{where}: duplicate key {brief(e.key, 60)} at line {e.line}; keep only one of them") from None
    _check_expansion(tree, where)
    return tree


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["kd.method=dkd", "warmup=none"]`` -> nested dict; values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override {brief(item)} is not KEY=VALUE (e.g. kd.method=dkd)")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw, f"override {brief(key, 60)}") if raw else None
        except yaml.YAMLError:
            value = raw
        _set_path(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


#: ``student.kd_boundary`` (runs made before ``optimizer_reset``) -> the ``optimizer_reset`` it meant
LEGACY_KD_BOUNDARY = {"keep": "none", "reset": "boundary"}

#: former warmup-loss names that spelled PKT's variant -> (the loss, ``warmup.pkt_variant``)
LEGACY_WARMUP_LOSSES = {"pkt_original": ("pkt", "original")}


def _normalise(tree: dict[str, Any]) -> dict[str, Any]:
    # `warmup: none` / `warmup: indistill` is shorthand for warmup.mode.
    if isinstance(tree.get("warmup"), str):
        tree["warmup"] = {"mode": tree["warmup"]}
    return upgrade_legacy(tree)


def upgrade_legacy(tree: dict[str, Any]) -> dict[str, Any]:
    """Read a config written under an older spelling, so committed run directories still load and resume:

    - ``student.kd_boundary: keep|reset`` (before ``student.optimizer_reset``) -> ``optimizer_reset: none|boundary``;
    - ``warmup.tap_loss`` / ``warmup.embedding_loss: pkt_original`` (PKT's variant spelled in the loss name) ->
      ``pkt`` and ``warmup.pkt_variant: original``, the one spelling of PKT's variant.
    """
    student = tree.get("student")
    if isinstance(student, dict) and "kd_boundary" in student:
        student = dict(student)
        old = student.pop("kd_boundary")
        if old not in LEGACY_KD_BOUNDARY:
            raise UserError(f"student.kd_boundary: '{old}' is not one of keep, reset "
                            f"(it is now student.optimizer_reset: {' | '.join(OPTIMIZER_RESETS)})")
        if student.get("optimizer_reset") not in (None, LEGACY_KD_BOUNDARY[old]):
            raise UserError("student.kd_boundary and student.optimizer_reset disagree; keep only optimizer_reset")
        student["optimizer_reset"] = LEGACY_KD_BOUNDARY[old]
        tree = {**tree, "student": student}
    warmup = tree.get("warmup")
    if isinstance(warmup, dict):
        legacy = {k: v for k in ("tap_loss", "embedding_loss")
                  if isinstance(v := warmup.get(k), str) and v in LEGACY_WARMUP_LOSSES}
        if legacy:
            warmup = dict(warmup)
            for key, old in legacy.items():
                loss, variant = LEGACY_WARMUP_LOSSES[old]
                other = [k for k in ("tap_loss", "embedding_loss") if k != key and warmup.get(k) == loss]
                if warmup.get("pkt_variant") not in (None, variant) or other:
                    raise UserError(f"warmup.{key}: {old} (PKT {variant}) disagrees with "
                                    f"{'warmup.pkt_variant' if not other else 'warmup.' + other[0] + ': ' + loss}; "
                                    f"write {key}: {loss} and warmup.pkt_variant: {variant}")
                warmup[key] = loss
                warmup["pkt_variant"] = variant
            tree = {**tree, "warmup": warmup}
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or defaults when ``path`` is None) and apply ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    where = "config"
    if path is not None:
        p = Path(path)
        try:
            found = p.is_file()
        except OSError as e:  # e.g. a name longer than the filesystem allows
            raise UserError(f"config file {brief(str(p), 200)} cannot be read ({e.strerror}); pass a YAML file (see configs/)") from None
        if not found:
            raise UserError(f"config file {brief(str(p), 200)} not found; pass a YAML file (see configs/)")
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{p}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                            f"save the config as UTF-8") from None
        except OSError as e:
            raise UserError(f"config file '{p}' cannot be read ({e.strerror}); check its permissions") from None
        try:
            tree = load_yaml(text, str(p)) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark else ""
            raise UserError(f"{p}: invalid YAML{at}; fix the syntax") from None
        if not isinstance(tree, dict):
            raise UserError(f"{p}: the top level must be a mapping of keys")
        where = str(p)
    tree = _normalise(tree)
    if overrides:
        extra = _normalise(parse_overrides(overrides))
        _check_shadowed(tree, extra)
        tree = _merge(tree, extra)
    _import_plugins(tree, where)
    return from_dict(Config, tree, where)


def _import_plugins(tree: dict[str, Any], where: str) -> None:
    """Import ``plugins`` before the rest of the config is checked: its names may be theirs."""
    plugins = tree.get("plugins")
    if plugins is None:
        return
    if isinstance(plugins, str):
        plugins = [plugins]
    if not isinstance(plugins, list):
        raise UserError(f"{where}.plugins: expected a list of module names, got {brief(repr(plugins), 80)}")
    from .registry import import_plugins

    import_plugins(plugins)


def _check_shadowed(tree: dict[str, Any], extra: dict[str, Any]) -> None:
    """An override of an arm default (``warmup=none``, ``kd.method=dkd``, ``kd.params.M.x=...``) applies to
    every arm that does not set its own value; when every arm it could reach sets its own, it would change
    nothing, silently: that is an error naming the arms that shadow it."""
    arms = tree.get("arms") if "arms" not in extra else None
    if not isinstance(arms, list):
        return
    w, k = extra.get("warmup"), extra.get("kd")
    checks: list[tuple[str, str, Any, str | None]] = []  # (key, shown, sets its own, method it addresses)
    if isinstance(w, dict) and "mode" in w:
        checks.append(("warmup", f"warmup={w['mode']}", lambda a: a.get("warmup") is not None, None))
    if isinstance(k, dict) and "method" in k:
        checks.append(("method", f"kd.method={k['method']}", lambda a: a.get("method") is not None, None))
    if isinstance(k, dict) and isinstance(k.get("params"), dict):
        for m in k["params"]:
            checks.append(("params", f"kd.params.{m}",
                           lambda a, m=m: a.get("params") is not None and (a.get("method") or "") == m, m))
    top = (k or {}).get("method") if isinstance(k, dict) else None
    top = top or (tree.get("kd") or {}).get("method") or KDSpec.method
    for key, shown, sets_own, method in checks:
        own = [str(a.get("name", "?")) for a in arms if isinstance(a, dict) and sets_own(a)]
        reached = [a for a in arms if isinstance(a, dict) and not sets_own(a)]
        if method is not None:  # kd.params.M reaches the arms whose (inherited) method is M
            reached = [a for a in reached if (a.get("method") or top) == method]
        if own and not reached:
            raise UserError(
                f"override {shown} is shadowed by arm{'s' if len(own) > 1 else ''} {', '.join(own)}, which set "
                f"their own {key}; override the arm list instead (arms=[...]) or drop {key} from those arms"
            )


def config_from_tree(tree: dict[str, Any], overrides: list[str] | None = None, where: str = "config") -> Config:
    """A config from a plain dict (the resolved config a report recorded) plus ``key=value`` overrides."""
    tree = _normalise(dict(tree))
    if overrides:
        tree = _merge(tree, _normalise(parse_overrides(overrides)))
    _import_plugins(tree, where)
    return from_dict(Config, tree, where)


def resolve_arms(cfg: Config) -> list[ArmSpec]:
    """The arms with every field filled from the top-level defaults (one arm named ``student`` if none)."""
    arms = list(cfg.arms) or [ArmSpec(name="student")]
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise UserError(f"arms need distinct names, got {brief(names, 200)}")
    out = []
    for a in arms:
        method = a.method or cfg.kd.method
        params = a.params if a.params is not None else cfg.kd.params.get(method, {})
        if not isinstance(params, dict):
            raise UserError(f"kd.params.{method} must be a mapping of parameters, got {brief(params)}")
        reference = a.reference or cfg.warmup.reference
        out.append(ArmSpec(
            name=a.name, warmup=a.warmup or cfg.warmup.mode, method=method, params=dict(params),
            reference=reference,
            optimizer_reset=a.optimizer_reset or cfg.student.optimizer_reset or REFERENCES[reference]["optimizer_reset"],
            pruned_bn=a.pruned_bn or cfg.warmup.pruned_bn or REFERENCES[reference]["pruned_bn"],
            baseline=list(a.baseline) if a.baseline is not None else None,
        ))
    return out


def describe_arm(arm: ArmSpec) -> str:
    """One line naming what an arm runs, including the choices the method description leaves open."""
    warm = "InDistill warmup, then " if arm.warmup == "indistill" else ""
    bn = f", pruned BN: {arm.pruned_bn}" if arm.warmup == "indistill" else ""
    return (f"{warm}{arm.method}; reference: {arm.reference} (optimizer reset: {arm.optimizer_reset}{bn})")


def resolved_tree(cfg: Config) -> dict[str, Any]:
    """``cfg`` as plain dicts, as a run writes it: fields marked ``omit_default`` (the top-level ``model`` and
    ``train`` only ``indistill train`` reads) are left out while they hold their defaults.

    Reading the tree back (:func:`config_from_tree`) gives ``cfg`` again. Comparisons (resuming a run) use
    the whole :func:`to_dict`, so an old run directory that wrote those sections still compares equal."""
    tree = to_dict(cfg)
    defaults = Config()
    for f in dataclasses.fields(Config):
        if f.metadata.get("omit_default") and getattr(cfg, f.name) == getattr(defaults, f.name):
            del tree[f.name]
    return tree


def dump_config(cfg: Config) -> str:
    """The YAML a run writes (``config.yaml``): :func:`resolved_tree`."""
    return yaml.safe_dump(resolved_tree(cfg), sort_keys=False)


def config_reference() -> str:
    """Every config key with its type and constraint, default and help, generated from the fields
    (docs/config.md)."""
    lines = ["# Config reference", "",
             "Generated from `src/indistill/config.py` by `indistill schema > docs/config.md` "
             "(a test fails when this file is stale). Set keys in YAML or as `key=value` overrides. "
             "The type column is the constraint every value is checked against: a listed vocabulary "
             "(`a | b`), a range, or a registry (`indistill methods`, `indistill datasets`; plug-ins add "
             "names through `plugins:`).", ""]

    def cell(text: str) -> str:
        return text.replace("|", chr(92) + "|")

    def walk(cls: type, prefix: str, default_obj: Any, title: str | None = None) -> None:
        hints = typing.get_type_hints(cls)
        doc = " ".join(_first_paragraph(cls.__doc__ or ""))
        title = title or prefix.rstrip(".") or "top level"
        lines.extend([f"## `{title}`", "", doc, "", "| key | type | default | meaning |", "|---|---|---|---|"])
        nested = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            value = getattr(default_obj, f.name)
            help_ = f.metadata.get("help", "")
            if dataclasses.is_dataclass(tp):
                nested.append((tp, f"{prefix}{f.name}.", value))
                lines.append(f"| `{prefix}{f.name}` | {tp.__name__} | (section below) | {cell(help_)} |")
                continue
            lines.append(f"| `{prefix}{f.name}` | {cell(constraint_text(tp, f))} | `{json_default(value)}` | "
                         f"{cell(help_)} |")
        lines.append("")
        for tp, p, v in nested:
            walk(tp, p, v)

    walk(Config, "", Config())
    walk(ArmSpec, "", ArmSpec(), title="arms[]")
    return "\n".join(lines).rstrip("\n") + "\n"


def _first_paragraph(doc: str) -> list[str]:
    out = []
    for line in doc.strip().splitlines():
        if not line.strip():
            break
        out.append(line.strip())
    return out


def constraint_text(tp: Any, f: dataclasses.Field | None = None) -> str:
    """The type of a field as docs/config.md shows it, with its constraint: ``auto | fp32 | null``,
    ``int, >= 1``, ``str, a registered optimizer``."""
    choices = choices_of(tp)
    bare = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (Union, types.UnionType) else [tp]
    item = typing.get_args(bare[0])[0] if len(bare) == 1 and typing.get_origin(bare[0]) is list else None
    if choices is not None:
        text = " | ".join("null" if c is None else str(c) for c in choices)
    elif item is not None and choices_of(item) is not None:
        text = "list of " + " | ".join(str(c) for c in choices_of(item))
    else:
        text = _type_name(tp)
    if f is not None:
        if "range" in f.metadata:
            text += f", {'each ' if item is not None else ''}{f.metadata['range']}"
        if "registry" in f.metadata:
            text += f", {'each ' if item is not None else ''}a registered {f.metadata['registry']}"
    return text


def _type_name(tp: Any) -> str:
    import re

    name = tp.__name__ if isinstance(tp, type) else str(tp)
    return re.sub(r"\b(?:[\w]+\.)+(\w+)", r"\1", name.replace("typing.", ""))


def json_default(value: Any) -> str:
    import json

    return json.dumps(to_dict(value), default=str)
