"""Typed configuration: dataclass schema, YAML loading, ``key=value`` overrides.

Every key is validated: a typo is a one-line ``UserError`` that names the key,
the closest valid keys and the file it came from.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import UserError, brief, clip, suggest


@dataclass
class OptimizerSpec:
    """The optimizer of one stage (one per student arm)."""

    name: str = "adam"  # adam, adamw, sgd, or any torch.optim class by name (rmsprop, nadam, ...)
    lr: float = 1e-3  # learning rate (> 0)
    weight_decay: float = 0.0  # L2 penalty (>= 0)
    momentum: float = 0.9  # SGD only
    nesterov: bool = False  # SGD only
    kwargs: dict[str, Any] = field(default_factory=dict)  # more keyword arguments of the optimizer (betas, eps, ...)


@dataclass
class SchedulerSpec:
    """The learning-rate schedule, stepped once per epoch over the stage's epochs (an arm's whole budget)."""

    name: str = "none"  # none, multistep, cosine, or any torch.optim.lr_scheduler class by name (exponential, ...)
    milestones: list[int] = field(default_factory=list)  # multistep: epochs after which lr *= gamma
    gamma: float = 0.1  # multistep: the factor
    kwargs: dict[str, Any] = field(default_factory=dict)  # a torch scheduler's keyword arguments (gamma, step_size, ...)


@dataclass
class TrainSpec:
    """How one stage trains: epochs, optimiser and learning-rate schedule."""

    epochs: int = 10  # epochs of the stage (a student arm: its whole budget)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)  # see below
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)  # see below
    eval_every: int = 1  # test top-1 every N epochs (0: never)
    precision: str | None = None  # this stage's autocast (auto | fp32 | bf16 | fp16); default: the run's `precision`


@dataclass
class DataSpec:
    """The dataset (`indistill datasets` lists them) and how it is batched."""

    name: str = "digits"  # a registered dataset: digits, fashion_mnist, cifar10, cifar100, imagenet, imagefolder
    root: str | None = None  # the folder to read; when set, the only place searched
    download: bool = False  # allow torchvision to download (never by default)
    batch_size: int = 128  # training batch (global, across processes)
    eval_batch_size: int = 512  # feature extraction batch
    train_subset: int | None = None  # a seeded, class-stratified subset of the training split
    test_subset: int | None = None  # the same for the test split
    num_workers: int = 2  # only for datasets read from files per batch (ImageFolder)
    kwargs: dict[str, Any] = field(default_factory=dict)  # the dataset's own options (e.g. digits: {image_size: 16})


@dataclass
class ModelSpec:
    """A zoo model by name, ``timm:<model>`` / ``torchvision:<model>``, or a user model as ``module.path:factory``.

    ``taps`` overrides or supplies tap specs (name -> module path, ``path:in``, or ``@output``); a model
    without registered taps has them found at the data's input size (``taps: auto``, the default for it).
    """

    name: str = "cnn32_small"  # a zoo model (`indistill models`), timm:<model>, torchvision:<model> or module.path:factory
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the model's factory
    taps: dict[str, str] | str | None = None  # tap name -> module path / path:in / @output; auto: found by a dry forward (the default without registered taps)
    checkpoint: str | None = None  # load trained weights from here instead of training
    reset_head: bool = False  # with checkpoint: keep the fresh classifier when the class counts differ


@dataclass
class TeacherSpec(ModelSpec):
    """The teacher: trained with cross-entropy here, or loaded from ``checkpoint``."""

    name: str = "cnn32"  # a zoo model, timm:<model>, torchvision:<model> or module.path:factory
    train: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=20))  # its cross-entropy training


@dataclass
class AuxiliarySpec(ModelSpec):
    """Stage 0: the auxiliary is trained with cross-entropy, then taught by the teacher with PKT."""

    enabled: bool = False  # use an auxiliary between teacher and student
    name: str = "cnn32"  # a zoo model, timm:<model>, torchvision:<model> or module.path:factory
    ce: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=20))  # its cross-entropy stage
    pkt: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=20))  # then PKT from the teacher's embedding
    pkt_variant: str = "reference"  # reference | original


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
    the default of ``warmup.reference: authors``). The schedule is never reset.
    """

    train: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=25))
    optimizer_reset: str | None = None  # none | boundary | phase | epoch; null: warmup.reference's choice


@dataclass
class WarmupSpec:
    """The InDistill curriculum every arm with ``warmup: indistill`` runs first (see docs/spec.md).

    Phase k (1-based) distils student tap ``taps[k-1]`` for ``a + k`` epochs
    (or ``phase_epochs[k-1]``) with ``tap_loss``; then, if ``embedding_epochs``
    > 0, the embedding with ``embedding_loss``. Its length is the sum of those:
    the KD method trains the rest of ``student.train.epochs``.
    """

    mode: str = "indistill"  # the default of every arm that does not set `warmup`: indistill | none
    taps: list[str] | None = None  # student stage taps, shallow to deep (default: all paired stage taps)
    pairs: dict[str, str] | None = None  # teacher tap -> student tap (default: automatic, equal H x W shallow to deep; see `indistill pair`)
    a: int = 2  # phase k lasts a + k epochs
    phase_epochs: list[int] | None = None  # explicit epochs per tap phase (instead of a + k)
    embedding_epochs: int = 0  # 0: the KD method itself follows the tap phases (the reference)
    schedule: str = "default"  # a registered curriculum (warmup.WARMUP_SCHEDULES): default = the paper's a + k
    tap_loss: str = "mse"  # the loss of the tap phases (a registered warmup loss: mse, or a plug-in's)
    embedding_loss: str = "pkt"  # pkt | pkt_original (or a plug-in's warmup loss)
    importance: str = "l1"  # l1 | group (torch-pruning coupled groups)
    producers: dict[str, str] = field(default_factory=dict)  # teacher tap -> producing conv path
    resize: str | None = None  # None | avgpool | bilinear (opt-in when spatial sizes differ; automatic pairs then go by depth)
    evaluate: bool = False  # test top-1 during the warmup epochs too (student.train.eval_every)
    # What the method description leaves open, as described (docs/spec.md, "Open choices") or as the authors' code does:
    reference: str = "described"  # described | authors: the defaults of optimizer_reset and pruned_bn (docs/method.md)
    pruned_bn: str | None = None  # teacher | authors (batch statistics, gamma kept, beta 0); null: reference's choice


@dataclass
class KDSpec:
    """Defaults of every arm: ``method`` for arms that name none; ``params`` keyed by method name
    (``params: {dkd: {beta: 8}, pkt: {variant: original}}``), so parameters belong to their method."""

    method: str = "pkt"  # `indistill methods` lists them; ce = cross-entropy only
    params: dict[str, dict[str, Any]] = field(default_factory=dict)  # method name -> its parameters


@dataclass
class ArmSpec:
    """One student variant trained from the same teacher (and auxiliary).

    Unset fields inherit the top-level defaults: ``warmup`` from ``warmup.mode``,
    ``method`` from ``kd.method``, ``params`` from ``kd.params[method]``.
    """

    name: str = "student"  # a plain name: the stage, checkpoint and export name
    warmup: str | None = None  # indistill | none
    method: str | None = None  # any registered KD method, `ce` included
    params: dict[str, Any] | None = None  # this arm's method parameters (default: kd.params[method])
    reference: str | None = None  # described | authors (default: warmup.reference)
    optimizer_reset: str | None = None  # none | boundary | phase | epoch (default: student.optimizer_reset)
    pruned_bn: str | None = None  # teacher | authors (default: warmup.pruned_bn)
    baseline: list[str] | None = None  # arms a grid pairs this one with (default: same method, no warmup)


@dataclass
class LoggingSpec:
    """Optional loggers beside log.txt and metrics.jsonl."""

    tensorboard: bool = False  # also write TensorBoard events to <run>/tb (pip install 'indistill[tensorboard]')


@dataclass
class EvalSpec:
    """Evaluation: top-1 on the test split and retrieval (database = train split, queries = test split)."""

    metrics: list[str] = field(default_factory=lambda: ["cosine", "euclidean"])  # retrieval similarities
    protocols: list[str] = field(default_factory=lambda: ["standard", "reference"])  # standard and/or the authors'
    ks: list[int] = field(default_factory=lambda: [1, 10, 100])  # precision@k
    extra_metrics: list[str] = field(default_factory=list)  # more retrieval metrics by name: mrr, r_precision, a plug-in's
    sources: bool = True  # also evaluate the teacher and auxiliary (a grid's cells evaluate only their student)
    latency_repeats: int = 10  # deployment view: timed CPU forwards per batch size (1 and 64), median reported; 0: no latency


@dataclass
class DistributedSpec:
    """Data-parallel runs under ``torchrun`` (ignored in one process)."""

    sync_bn: bool = False  # SyncBatchNorm over all ranks in the trained modules (CUDA only)


@dataclass
class Config:
    """The whole run. ``indistill run`` uses teacher/auxiliary/student/warmup/kd/arms;
    ``indistill train`` uses ``model`` and ``train``."""

    name: str = "run"  # the run's name: a plain directory name
    out_dir: str = "runs"  # the run directory is out_dir/name
    seed: int = 0  # model init, data order and augmentation; a grid's first seed
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # autocast: auto (bf16 where the device runs it natively, else fp32) | fp32 | bf16 | fp16
    channels_last: bool = False  # NHWC memory format (faster convs with AMP on GPUs)
    progress: bool = True  # progress bars on a terminal
    data: DataSpec = field(default_factory=DataSpec)  # the dataset
    model: ModelSpec = field(default_factory=ModelSpec)  # `indistill train`'s model
    # `indistill train` (a plain supervised run) defaults to Adam 2e-3 annealed by a cosine schedule:
    # on Fashion-MNIST, cnn32_small reached 87.95% in 10 epochs with Adam 1e-3 + cosine, 89.02% with 2e-3.
    train: TrainSpec = field(default_factory=lambda: TrainSpec(
        optimizer=OptimizerSpec(lr=2e-3), scheduler=SchedulerSpec(name="cosine")))
    teacher: TeacherSpec = field(default_factory=TeacherSpec)  # the teacher
    auxiliary: AuxiliarySpec = field(default_factory=AuxiliarySpec)  # the optional auxiliary teacher
    student: StudentSpec = field(default_factory=StudentSpec)  # the student and every arm's budget
    warmup: WarmupSpec = field(default_factory=WarmupSpec)  # the InDistill curriculum (arm default)
    kd: KDSpec = field(default_factory=KDSpec)  # the KD method (arm default) and per-method params
    arms: list[ArmSpec] = field(default_factory=list)  # student variants; default: one arm named student
    evaluate: EvalSpec = field(default_factory=EvalSpec)  # what is measured
    logging: LoggingSpec = field(default_factory=LoggingSpec)  # optional loggers
    distributed: DistributedSpec = field(default_factory=DistributedSpec)  # torchrun options
    # Stop a stage whose epoch loss exceeds this factor of its phase's first epoch (an exploded but finite
    # loss), keeping the last good checkpoint, as a non-finite loss does. 0 disables the check.
    loss_guard: float = 1e4  # stop a stage whose epoch loss exceeds this x its phase's first (0: off)
    # Modules imported before anything is built, so the methods, models, datasets, optimizers and warmup
    # losses they register can be named in this config (`plugins: [mypackage.kd]`).
    plugins: list[str] = field(default_factory=list)  # modules to import first (a user's registrations)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


_CHOICES: dict[tuple[str, str], tuple[Any, ...]] = {
    ("Config", "precision"): ("auto", "fp32", "bf16", "fp16"),
    ("StudentSpec", "optimizer_reset"): (None, "none", "boundary", "phase", "epoch"),
    ("WarmupSpec", "reference"): ("described", "authors"),
    ("WarmupSpec", "pruned_bn"): (None, "teacher", "authors"),
    ("ArmSpec", "reference"): (None, "described", "authors"),
    ("ArmSpec", "optimizer_reset"): (None, "none", "boundary", "phase", "epoch"),
    ("ArmSpec", "pruned_bn"): (None, "teacher", "authors"),
    ("TrainSpec", "precision"): (None, "auto", "fp32", "bf16", "fp16"),
    ("WarmupSpec", "mode"): ("indistill", "none"),
    ("WarmupSpec", "importance"): ("l1", "group"),
    ("WarmupSpec", "resize"): (None, "avgpool", "bilinear"),
    ("AuxiliarySpec", "pkt_variant"): ("reference", "original"),
    ("ArmSpec", "warmup"): (None, "indistill", "none"),
    ("EvalSpec", "metrics"): ("cosine", "euclidean"),
    ("EvalSpec", "protocols"): ("standard", "reference"),
}


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
        parts = []
        if self.lo is not None:
            parts.append(f"{'>=' if self.lo_incl else '>'} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<=' if self.hi_incl else '<'} {self.hi:g}")
        return " and ".join(parts)


_AT_LEAST_1 = _Range(1)
_AT_LEAST_0 = _Range(0)
_POSITIVE = _Range(0, lo_incl=False)

# Numeric keys by (class name, field), like _CHOICES: a class missing here is simply not checked.
# List fields are checked item by item; None (an unset optional) is always allowed.
_RANGES: dict[tuple[str, str], _Range] = {
    ("Config", "seed"): _Range(0, hi=2**32 - 1),  # numpy/sklearn seeds are 32-bit unsigned
    ("DataSpec", "batch_size"): _AT_LEAST_1,
    ("DataSpec", "eval_batch_size"): _AT_LEAST_1,
    ("DataSpec", "train_subset"): _AT_LEAST_1,
    ("DataSpec", "test_subset"): _AT_LEAST_1,
    ("DataSpec", "num_workers"): _AT_LEAST_0,
    ("TrainSpec", "epochs"): _AT_LEAST_1,  # teacher.train, auxiliary.ce/pkt, student.train, train
    ("TrainSpec", "eval_every"): _AT_LEAST_0,  # 0: never
    ("OptimizerSpec", "lr"): _POSITIVE,
    ("OptimizerSpec", "weight_decay"): _AT_LEAST_0,
    ("OptimizerSpec", "momentum"): _Range(0, hi=1, hi_incl=False),
    ("SchedulerSpec", "milestones"): _AT_LEAST_1,
    ("SchedulerSpec", "gamma"): _Range(0, lo_incl=False, hi=1),
    ("WarmupSpec", "a"): _AT_LEAST_0,
    ("WarmupSpec", "phase_epochs"): _AT_LEAST_1,
    ("WarmupSpec", "embedding_epochs"): _AT_LEAST_0,  # 0: the arm's method follows the tap phases
    ("Config", "loss_guard"): _AT_LEAST_0,  # 0: off
    ("EvalSpec", "ks"): _AT_LEAST_1,
    ("EvalSpec", "latency_repeats"): _AT_LEAST_0,  # 0: no latency measured
}

# Keys that become file or directory names (the run directory, per-arm checkpoints and exports).
_PLAIN_NAMES: set[tuple[str, str]] = {("Config", "name"), ("ArmSpec", "name")}

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


def _check_value(cls: type, key: str, value: Any, where: str) -> None:
    """Range-check numeric keys (``_RANGES``) and plain-name keys (``_PLAIN_NAMES``)."""
    name = (cls.__name__, key)
    if key == "taps" and issubclass(cls, ModelSpec) and isinstance(value, str) and value != "auto":
        raise UserError(f"{where}: {brief(value)} is neither auto nor a mapping of tap name -> module path")
    if name in _PLAIN_NAMES and isinstance(value, str):
        _check_plain_name(value, where)
    rng = _RANGES.get(name)
    if rng is None or value is None:
        return
    for i, v in enumerate(value if isinstance(value, list) else [value]):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue  # the type check has already reported non-numbers
        if not rng.admits(v):
            at = f"{where}[{i}]" if isinstance(value, list) else where
            raise UserError(f"{at}: {brief(v)} is out of range; valid: {rng}")


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


def _check_registered(kind: str):
    """A check that a name resolves in the registry of ``kind`` (imported when first used: no cycle)."""

    def check(value: Any, where: str) -> None:
        from . import evaluate, optim, warmup

        registry = {"optimizer": optim.OPTIMIZERS, "scheduler": optim.SCHEDULERS, "loss": warmup.WARMUP_LOSSES,
                    "schedule": warmup.WARMUP_SCHEDULES, "rank_metric": evaluate.RANK_METRICS}[kind]
        for i, v in enumerate(value if isinstance(value, list) else [value]):
            optim.check_name(registry, v, f"{where}[{i}]" if isinstance(value, list) else where)

    return check


# Keys whose valid values live in a registry (plug-ins add to them), checked when a config is read.
_REGISTERED: dict[tuple[str, str], Any] = {
    ("OptimizerSpec", "name"): _check_registered("optimizer"),
    ("SchedulerSpec", "name"): _check_registered("scheduler"),
    ("WarmupSpec", "tap_loss"): _check_registered("loss"),
    ("WarmupSpec", "embedding_loss"): _check_registered("loss"),
    ("WarmupSpec", "schedule"): _check_registered("schedule"),
    ("EvalSpec", "extra_metrics"): _check_registered("rank_metric"),
}


def _check_choice(cls: type, key: str, value: Any, where: str) -> None:
    check = _REGISTERED.get((cls.__name__, key))
    if check is not None and value is not None:
        check(value, where)
        return
    choices = _CHOICES.get((cls.__name__, key))
    if choices is None:
        return
    for v in value if isinstance(value, list) else [value]:
        if v not in choices:
            shown = ", ".join("null" if c is None else str(c) for c in choices)
            raise UserError(f"{where}: {brief(str(v))} is not one of {shown}")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check and convert ``value`` to annotation ``tp`` (dataclasses recursively)."""
    origin = typing.get_origin(tp)
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
    if tp is Any:
        return value
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
        _check_choice(cls, key, kwargs[key], sub)
        _check_value(cls, key, kwargs[key], sub)
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

#: what ``warmup.reference`` sets where ``optimizer_reset`` / ``pruned_bn`` are left unset
REFERENCES: dict[str, dict[str, str]] = {
    "described": {"optimizer_reset": "phase", "pruned_bn": "teacher"},
    "authors": {"optimizer_reset": "epoch", "pruned_bn": "authors"},
}


def _normalise(tree: dict[str, Any]) -> dict[str, Any]:
    # `warmup: none` / `warmup: indistill` is shorthand for warmup.mode.
    if isinstance(tree.get("warmup"), str):
        tree["warmup"] = {"mode": tree["warmup"]}
    return upgrade_legacy(tree)


def upgrade_legacy(tree: dict[str, Any]) -> dict[str, Any]:
    """Read a config written before ``student.optimizer_reset`` existed (``kd_boundary: keep|reset``)."""
    student = tree.get("student")
    if isinstance(student, dict) and "kd_boundary" in student:
        student = dict(student)
        old = student.pop("kd_boundary")
        if old not in LEGACY_KD_BOUNDARY:
            raise UserError(f"student.kd_boundary: '{old}' is not one of keep, reset "
                            f"(it is now student.optimizer_reset: none | boundary | phase | epoch)")
        if student.get("optimizer_reset") not in (None, LEGACY_KD_BOUNDARY[old]):
            raise UserError("student.kd_boundary and student.optimizer_reset disagree; keep only optimizer_reset")
        student["optimizer_reset"] = LEGACY_KD_BOUNDARY[old]
        tree = {**tree, "student": student}
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


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _field_comments(cls: type) -> dict[str, str]:
    """``name -> trailing comment`` of each field line in the class source (the schema's own words)."""
    import inspect
    import re

    out: dict[str, str] = {}
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return out
    for line in src.splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def config_reference() -> str:
    """Every config key with its type, default and one line, generated from the dataclasses (docs/config.md)."""
    lines = ["# Config reference", "",
             "Generated from `src/indistill/config.py` by `indistill schema > docs/config.md` "
             "(a test fails when this file is stale). Set keys in YAML or as `key=value` overrides.", ""]

    def walk(cls: type, prefix: str, default_obj: Any, title: str | None = None) -> None:
        hints = typing.get_type_hints(cls)
        notes = _field_comments(cls)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        title = title or prefix.rstrip(".") or "top level"
        lines.extend([f"## `{title}`", "", doc, "", "| key | type | default | meaning |", "|---|---|---|---|"])
        nested = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            value = getattr(default_obj, f.name)
            if dataclasses.is_dataclass(tp):
                nested.append((tp, f"{prefix}{f.name}.", value))
                lines.append(f"| `{prefix}{f.name}` | {tp.__name__} | (section below) | {notes.get(f.name, '')} |")
                continue
            shown = json_default(value)
            tname = _type_name(tp)
            choices = _CHOICES.get((cls.__name__, f.name))
            note = notes.get(f.name, "")
            if choices and "|" not in note:
                note = (note + "; " if note else "") + "one of " + ", ".join("null" if c is None else str(c) for c in choices)
            lines.append(f"| `{prefix}{f.name}` | {tname.replace('|', chr(92) + '|')} | `{shown}` | "
                         f"{note.replace('|', chr(92) + '|')} |")
        lines.append("")
        for tp, p, v in nested:
            walk(tp, p, v)

    walk(Config, "", Config())
    walk(ArmSpec, "", ArmSpec(), title="arms[]")
    return "\n".join(lines).rstrip("\n") + "\n"


def _type_name(tp: Any) -> str:
    import re

    name = tp.__name__ if isinstance(tp, type) else str(tp)
    return re.sub(r"\b(?:[\w]+\.)+(\w+)", r"\1", name.replace("typing.", ""))


def json_default(value: Any) -> str:
    import json

    return json.dumps(to_dict(value), default=str)

