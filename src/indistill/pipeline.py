"""The InDistill pipeline: teacher -> (auxiliary) -> student arms -> evaluate.

The pipeline only orders stages: :mod:`indistill.stages` builds them, the
:class:`~indistill.engine.Engine` runs them (each reads the previous stage's
checkpoint and writes its own, so re-running a command resumes it), and
:class:`~indistill.rundir.RunDir` keeps the run directory's books.

Under ``torchrun`` every rank runs the same pipeline (see :mod:`indistill.distributed`): rank 0
claims the run directory and writes every file, the other ranks train and evaluate alongside it.

Every student *arm* (e.g. cross-entropy, PKT, InDistill + PKT) is ONE run of
``student.train.epochs`` epochs under one optimizer and one LR schedule: the
warmup occupies the first epochs of an arm that has it, the KD method the rest.
Every arm starts from the same initial student and sees the same data order.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from . import distributed as ddp
from .checkpoint import atomic_write_json, export_safetensors, load_weights
from .config import ArmSpec, Config, ModelSpec, check_run_location, describe_arm, resolve_arms, to_dict
from .data import DataSplits, get_dataset
from .data.base import DATASETS
from .engine import Engine, Stage, TensorBoardLogger, get_logger, resolve_config_precision, select_device
from .errors import UserError
from .models import create_model, declare_model, model_name, model_record, model_taps, tap_shapes
from .models.auto import resolve_taps
from .models.external import is_external
from .models.registry import call_factory, resolve_factory
from .rundir import RunDir
from .stages import (
    arm_stage, auxiliary_pkt_stage, build_method, model_meta, supervised_stage, top1_evaluator,
)
from .methods import get_method_class
from .pairing import TapPairs, pair_taps
from .warmup import InDistillWarmup, build_warmup


def load_data(cfg: Config) -> DataSplits:
    d = cfg.data
    reserved = {"root", "download", "train_subset", "test_subset", "num_workers"} & set(d.kwargs)
    if reserved:
        raise UserError(f"data.kwargs sets {', '.join(sorted(reserved))}, which are data keys of their own; "
                        f"set data.{sorted(reserved)[0]} instead")
    kw = dict(root=d.root, download=d.download, train_subset=d.train_subset, test_subset=d.test_subset,
              num_workers=d.num_workers, **d.kwargs)
    try:
        inspect.signature(DATASETS.get(d.name)).bind(**kw)
    except TypeError as e:  # an option the dataset's factory does not take
        raise UserError(f"dataset '{d.name}' does not take data.kwargs {sorted(d.kwargs)} "
                        f"({str(e).splitlines()[0][:160]}); check its options") from None
    return get_dataset(d.name, **kw)


def build_model(spec: ModelSpec, data: DataSplits) -> nn.Module:
    """A zoo model by name, ``timm:<model>`` / ``torchvision:<model>``, or a user factory ``package.module:function``.

    Taps: the registered ones updated by ``spec.taps``; a model without registered taps (or ``taps: auto``)
    has them found by one dry forward at the data's input size (:mod:`indistill.models.auto`).
    """
    shape = input_shape_of(data)
    if ":" in spec.name and not is_external(spec.name):
        model = call_factory(resolve_factory(spec.name), spec.name, num_classes=data.num_classes,
                             in_channels=data.in_channels, **spec.kwargs)
        rec = model_record(model)  # a factory may declare its own taps
        return declare_model(model, resolve_taps(model, spec.taps, shape, rec.taps if rec is not None else None),
                             spec.name)
    model = create_model(spec.name, num_classes=data.num_classes, in_channels=data.in_channels, input_shape=shape,
                         taps=spec.taps, **spec.kwargs)
    if spec.taps:  # the name the config gave (an alias) names the model, as it always has
        declare_model(model, model_taps(model), spec.name)
    return model


def input_shape_of(data: DataSplits) -> tuple[int, int, int]:
    """``(channels, height, width)`` of the data's images: what a model is built, paired and pruned at."""
    return (data.in_channels, data.image_size, data.image_size)


def load_student_checkpoint(student: nn.Module, spec: ModelSpec) -> nn.Module:
    """Load ``student.checkpoint`` into ``student`` (``weights_only=True``, strict but for ``reset_head``):
    the weights every arm starts from. A missing, corrupt or unfitting file is a one-line :class:`UserError`."""
    try:
        return load_weights(student, spec.checkpoint, reset_head=spec.reset_head)
    except UserError as e:
        raise UserError(f"student.checkpoint: {e} (or unset student.checkpoint to start every arm from a "
                        f"fresh seeded student)") from None


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class SourceSpec(NamedTuple):
    """The model a config's warmup and KD methods distil from: the auxiliary if enabled, else the teacher."""

    role: str  # "auxiliary" or "teacher"
    spec: ModelSpec
    stage: str  # the run's stage whose final checkpoint holds it trained ("auxiliary_pkt" or "teacher")


def source_spec(cfg: Config) -> SourceSpec:
    """Which model of ``cfg`` is the distillation source (see :class:`SourceSpec`)."""
    if cfg.auxiliary.enabled:
        return SourceSpec("auxiliary", cfg.auxiliary, "auxiliary_pkt")
    return SourceSpec("teacher", cfg.teacher, "teacher")


def schedule_warnings(cfg: Config) -> list[str]:
    """What a config's LR schedules will silently not do: multistep milestones at or beyond their stage's
    epochs (the scheduler steps once per epoch, so milestone m only acts on epoch m + 1).

    Only the stages ``indistill run`` trains: the teacher and auxiliary unless loaded from a checkpoint,
    and the students (every arm's budget).
    """
    stages = [] if cfg.teacher.checkpoint else [("teacher.train", cfg.teacher.train)]
    if cfg.auxiliary.enabled and not cfg.auxiliary.checkpoint:
        stages += [("auxiliary.ce", cfg.auxiliary.ce), ("auxiliary.pkt", cfg.auxiliary.pkt)]
    stages.append(("student.train", cfg.student.train))
    out = []
    for key, train in stages:
        sched = train.scheduler
        late = sorted(m for m in sched.milestones if m >= train.epochs)
        if sched.name != "multistep" or not late:
            continue
        effect = ("the learning rate never decays" if len(late) == len(sched.milestones)
                  else f"the decay{'s' if len(late) > 1 else ''} at {late} never happen{'' if len(late) > 1 else 's'}")
        # e.g. the same share of the budget as the paper's 60 of 70 epochs
        example = f" (e.g. {key}.scheduler.milestones=[{max(1, train.epochs * 6 // 7)}])" if train.epochs > 1 else ""
        out.append(f"{key}.scheduler.milestones {list(sched.milestones)} with {key}.epochs={train.epochs}: {effect}; "
                   f"set milestones below {train.epochs}{example} or raise the epochs")
    return out


@dataclass
class Trained:
    """A model the pipeline produced, with its role and where it came from."""

    name: str
    model: nn.Module
    role: str
    checkpoint: Path


class Pipeline:
    """Runs the stages of one config in its run directory."""

    def __init__(self, cfg: Config, *, data: DataSplits | None = None):
        check_run_location(cfg)
        self.cfg = cfg
        self.rundir = RunDir(cfg.run_dir)
        self.run_dir = cfg.run_dir
        ddp.init_from_env(cfg.device)  # joins torchrun's process group; nothing in one process
        self.device = select_device(cfg.device)
        # `auto` -> bf16 or fp32 for this device, before the run directory records the config
        resolve_config_precision(cfg, self.device)
        self.log = get_logger(self.run_dir, to_file=False)
        if data is None and cfg.data.download and ddp.is_distributed():
            ddp.on_main(lambda: load_data(cfg) and None)  # rank 0 downloads; the others then find the files
        self.data = data or load_data(cfg)
        self.input_shape = input_shape_of(self.data)
        self.pairings: dict[str, dict[str, Any]] = {}  # arm -> the stage pairs it distilled (results.json)
        self.engine = Engine(
            self.run_dir, self.data.train, batch_size=cfg.data.batch_size, device=self.device,
            precision=cfg.precision, channels_last=cfg.channels_last, seed=cfg.seed, progress=cfg.progress,
            logger=self.log, loss_guard=cfg.loss_guard, sync_bn=cfg.distributed.sync_bn,
        )

    def seeded_model(self, spec: ModelSpec) -> nn.Module:
        """Build ``spec`` on the run's device, initialised from ``cfg.seed`` (a re-run builds the same weights).
        The module-level :func:`build_model` is unseeded."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            return build_model(spec, self.data).to(self.device)

    def initial_student(self) -> nn.Module:
        """The student every arm starts from: :meth:`seeded_model`, with ``student.checkpoint``'s weights where
        the config names one (see :func:`load_student_checkpoint`)."""
        student = self.seeded_model(self.cfg.student)
        if self.cfg.student.checkpoint:
            load_student_checkpoint(student, self.cfg.student)
        return student

    def meta(self, spec: ModelSpec, role: str, **extra: Any) -> dict[str, Any]:
        return model_meta(spec, self.data, role, **extra)

    def _evaluator(self, model: nn.Module):
        return top1_evaluator(model, self.data, self.device, self.cfg.data.eval_batch_size)

    # -- the run directory -----------------------------------------------------
    def claim(self) -> None:
        """Lock the run directory and record the config; only after validation has passed.

        Under torchrun rank 0 does this (and alone holds the lock); a refusal stops every rank.
        """

        def take() -> None:
            self.rundir.log = self.log
            self.rundir.check(self.cfg)
            self.rundir.lock()
            self.rundir.claim(self.cfg)

        ddp.on_main(take)
        self.log = get_logger(self.run_dir, to_file=True)
        self.engine.log = self.log
        if ddp.is_main() and self.cfg.logging.tensorboard and not any(isinstance(c, TensorBoardLogger) for c in self.engine.callbacks):
            self.engine.callbacks.append(TensorBoardLogger(self.run_dir / "tb"))

    def release(self) -> None:
        for cb in self.engine.callbacks:
            cb.close()
        self.rundir.unlock()  # a no-op on ranks > 0, which never took the lock

    @contextmanager
    def claimed(self) -> Iterator[None]:
        """:meth:`claim` the run directory for the block, then :meth:`release` it; a :class:`UserError` in the
        block is recorded first, so the corrected command may then take the directory (``RunDir.check``)."""
        self.claim()
        try:
            yield
        except UserError as e:
            self.rundir.record_failure(str(e))
            raise
        finally:
            self.release()

    # -- stages ------------------------------------------------------------------
    def teacher(self) -> Trained:
        spec = self.cfg.teacher
        model = self.seeded_model(spec)
        if spec.checkpoint:
            load_weights(model, spec.checkpoint, reset_head=spec.reset_head)
            self.log.info(f"[teacher] loaded {spec.checkpoint}")
            return Trained("teacher", model, "teacher", Path(spec.checkpoint))
        self.engine.fit(supervised_stage("teacher", model, spec.train, evaluate=self._evaluator(model),
                                         meta=self.meta(spec, "teacher")))
        return Trained("teacher", model, "teacher", self.engine.checkpoint_path("teacher"))

    def auxiliary(self, teacher: nn.Module) -> Trained:
        """Stage 0: the auxiliary trains with cross-entropy, then learns the teacher's embedding by PKT."""
        spec = self.cfg.auxiliary
        aux = self.seeded_model(spec)
        if spec.checkpoint:
            load_weights(aux, spec.checkpoint)
            return Trained("auxiliary", aux, "auxiliary", Path(spec.checkpoint))
        meta = self.meta(spec, "auxiliary")
        self.engine.fit(supervised_stage("auxiliary_ce", aux, spec.ce, evaluate=self._evaluator(aux), meta=meta))
        self.engine.fit(auxiliary_pkt_stage(aux, teacher, spec.pkt, variant=spec.pkt_variant,
                                            evaluate=self._evaluator(aux), meta=meta))
        return Trained("auxiliary", aux, "auxiliary", self.engine.checkpoint_path("auxiliary_pkt"))

    def tap_pairs(self, arm: ArmSpec, source: nn.Module, student: nn.Module) -> TapPairs | None:
        """The arm's stage pairs, made once for its warmup and its KD method; None where neither reads stage taps."""
        if arm.warmup != "indistill" and "stages" not in get_method_class(arm.method or "").uses:
            return None
        w = self.cfg.warmup
        return pair_taps(source, student, self.input_shape, pairs=w.pairs, resize=w.resize,
                         role=source_spec(self.cfg).role)

    def warmup_for(self, arm: ArmSpec, source: nn.Module, student: nn.Module,
                   pairs: TapPairs | None = None) -> InDistillWarmup | None:
        """The InDistill warmup of ``arm`` (``source`` pruned to ``student``'s widths, and its schedule), or
        None for an arm without one; ``pairs`` are the arm's stage pairs (:meth:`tap_pairs`), made here if None."""
        if arm.warmup != "indistill":
            return None
        return build_warmup(self.cfg.warmup, source, student, self.input_shape, pruned_bn=arm.pruned_bn, pairs=pairs)

    def arm(self, arm: ArmSpec, source: nn.Module, student: nn.Module) -> Stage:
        """Build (not run) one arm's stage."""
        pairs = self.tap_pairs(arm, source, student)
        warmup = self.warmup_for(arm, source, student, pairs)
        train = self.cfg.student.train
        W = warmup.epochs if warmup is not None else 0
        method, t_want, s_want = build_method(
            arm, source, student, pairs=pairs, input_shape=self.input_shape, data=self.data,
            epochs=max(1, train.epochs - W), seed=self.cfg.seed, stage_name=arm.name,
        )
        stage = arm_stage(
            arm, student, source, warmup=warmup, method=method.to(self.device), t_want=t_want, s_want=s_want,
            train=train, optimizer_reset=arm.optimizer_reset or "phase", warmup_spec=self.cfg.warmup,
            evaluate=self._evaluator(student),
            meta=self.meta(self.cfg.student, "student", arm=arm.name, warmup=arm.warmup, method=arm.method,
                           warmup_epochs=W, reference=arm.reference, optimizer_reset=arm.optimizer_reset,
                           pruned_bn=arm.pruned_bn),
            pairs=pairs,
        )
        return stage

    def student(self, arm: ArmSpec, source: nn.Module) -> Trained:
        student = self.initial_student()  # every arm starts from the same initial student
        stage = self.arm(arm, source, student)
        self.log.info(f"[{arm.name}] {describe_arm(arm)}; optimizer state cleared at the start of epochs "
                      f"{[e + 1 for e in stage.reset_optimizer_at] or 'none'}")
        pairs = stage.pairs
        if pairs is not None:  # the pairing this arm distils (its warmup and KD method alike): log and results
            self.pairings[arm.name] = pairs.record()
            self.log.info(f"[{arm.name}] stage pairs by {pairs.how}: " + "; ".join(
                f"{p.teacher.name} ({p.teacher.spec}, {p.teacher.show()}) -> {p.student.name} ({p.student.spec}, "
                f"{p.student.show()})" for p in pairs.pairs))
        warmup = stage.warmup
        if warmup is not None and warmup.pruned.teacher_bn_taps:
            self.log.info(f"[{arm.name}] pruned BN: authors, but no BatchNorm reads the producer of "
                          f"{', '.join(warmup.pruned.teacher_bn_taps)}: those targets keep the teacher's activation")
        if warmup is not None and ddp.is_main():
            atomic_write_json(self.run_dir / f"prune_{arm.name}.json", warmup.prune_record())
        self.engine.fit(stage)
        if ddp.is_main():
            export_safetensors(
                student, self.run_dir / "export" / f"{arm.name}.safetensors",
                metadata={"model": self.cfg.student.name, "arm": arm.name, "warmup": str(arm.warmup),
                          "method": str(arm.method), "dataset": self.data.name},
            )
        return Trained(arm.name, student, "student", self.engine.checkpoint_path(arm.name))

    def validate(self, one_batch: bool = False) -> None:
        """Build everything on untrained models: taps, widths, schedules, budgets, methods; with
        ``one_batch``, also push one batch through every stage's loss (no optimizer step)."""
        dev = self.device
        models = {"teacher": build_model(self.cfg.teacher, self.data).to(dev),
                  "student": build_model(self.cfg.student, self.data).to(dev)}
        if self.cfg.auxiliary.enabled:
            models["auxiliary"] = build_model(self.cfg.auxiliary, self.data).to(dev)
        # The checkpoints the config names must exist and fit before the run directory is claimed: a run
        # that failed on them later would hold a config.yaml that refuses the corrected command.
        if self.cfg.teacher.checkpoint:
            load_weights(models["teacher"], self.cfg.teacher.checkpoint, reset_head=self.cfg.teacher.reset_head)
        if self.cfg.auxiliary.enabled and self.cfg.auxiliary.checkpoint:
            load_weights(models["auxiliary"], self.cfg.auxiliary.checkpoint)
        if self.cfg.student.checkpoint:  # every arm starts from it
            load_student_checkpoint(models["student"], self.cfg.student)
        for role, m in models.items():
            try:
                tap_shapes(m, model_taps(m), self.input_shape)
            except UserError as e:
                raise UserError(f"{role} taps: {e}") from None
        source = models.get("auxiliary", models["teacher"])
        batch = next(iter(self.data.train.batches(min(8, len(self.data.train)), shuffle=False, device=dev))) if one_batch else None
        if batch is not None:
            for role, m in models.items():
                if role != "student":
                    supervised_stage(role, m, self.cfg.teacher.train).loss_fn(batch, 0)["ce"].backward()
            if self.cfg.auxiliary.enabled:
                st = auxiliary_pkt_stage(models["auxiliary"], models["teacher"], self.cfg.auxiliary.pkt)
                try:
                    st.loss_fn(batch, 0)
                finally:
                    st.close()
        for arm in resolve_arms(self.cfg):
            student = build_model(self.cfg.student, self.data).to(dev)
            stage = self.arm(arm, source, student)
            try:
                if batch is not None:
                    W = int(stage.meta.get("warmup_epochs", 0))
                    warm = stage.warmup
                    epochs = sorted({0, W} | {p.start for p in (warm.schedule if warm is not None else [])})
                    for e in (x for x in epochs if x < stage.train.epochs):
                        sum(stage.loss_fn(batch, e).values()).backward()
            finally:
                stage.close()

    # -- evaluation ----------------------------------------------------------------
    def evaluate(self, models: list[Trained], cache: bool = True) -> dict[str, Any]:
        """Top-1 and retrieval of each model; cached in ``eval/`` keyed by the checkpoint it came from.

        Under torchrun every rank evaluates (feature extraction is sharded and gathered, so every rank
        computes the same numbers); rank 0 writes the cache, and ranks agree on whether it was a hit.
        """
        from .evaluate import evaluate_model

        e = self.cfg.evaluate
        settings = {**to_dict(e), "dataset": self.data.name, "train_subset": self.cfg.data.train_subset,
                    "test_subset": self.cfg.data.test_subset}
        if not settings.get("extra_metrics"):  # an evaluation cached before the key existed stays valid
            settings.pop("extra_metrics", None)
        settings.pop("latency_repeats", None)  # how the deployment view is timed, not what is evaluated
        out: dict[str, Any] = {}
        for t in models:
            key = self.rundir.cache_key(t.checkpoint, settings) if cache and t.checkpoint.is_file() else None
            hit = self.rundir.cached(t.name, key) if key is not None else None
            if ddp.agree(hit is not None, f"whether {t.name}'s evaluation is cached"):
                if "deployment" not in hit:  # cached before the deployment view existed: measured once, kept
                    hit["deployment"] = self._deployment(t)
                    if ddp.is_main():
                        self.rundir.store(t.name, key, hit)
                out[t.name] = self._with_pairing(t.name, hit)
                continue
            self.log.info(f"[evaluate] {t.name}")
            res = evaluate_model(
                t.model, model_taps(t.model), self.data, device=self.device, metrics=tuple(e.metrics),
                protocols=tuple(e.protocols), ks=tuple(e.ks), extra_metrics=tuple(e.extra_metrics),
            )
            res.update({"role": t.role, "model": model_name(t.model),
                        "params": count_params(t.model), "checkpoint": str(t.checkpoint)})
            res["deployment"] = self._deployment(t)  # cached with the evaluation: a re-run reports the same numbers
            if key is not None and ddp.is_main():
                self.rundir.store(t.name, key, res)
            out[t.name] = self._with_pairing(t.name, res)
        return out

    def _deployment(self, t: Trained) -> dict[str, Any]:
        """Params, FLOPs, size on disk and CPU latency of a trained model (:mod:`indistill.deploy`)."""
        from .deploy import deployment_stats

        return deployment_stats(t.model, self.input_shape, checkpoint=t.checkpoint,
                                repeats=self.cfg.evaluate.latency_repeats)

    def _with_pairing(self, name: str, res: dict[str, Any]) -> dict[str, Any]:
        """An arm's results with the stage pairs it distilled (made this invocation, so never stale)."""
        return {**res, "pairing": self.pairings[name]} if name in self.pairings else res

    def run(self, command: str = "indistill run") -> dict[str, Any]:
        """Validate, claim the run directory, run every stage, evaluate and report; returns the results dict."""
        return self._run(command, arms=True)

    def run_sources(self, command: str = "indistill grid") -> dict[str, Any]:
        """Only the teacher (and auxiliary): what a grid shares between its cells."""
        return self._run(command, arms=False)

    def pending_stages(self, arms: bool = True) -> list[str]:
        """The stages of this run without a final checkpoint yet: empty when a re-run has nothing to train."""
        names = [] if self.cfg.teacher.checkpoint else ["teacher"]
        if self.cfg.auxiliary.enabled and not self.cfg.auxiliary.checkpoint:
            names += ["auxiliary_ce", "auxiliary_pkt"]
        names += [a.name for a in resolve_arms(self.cfg)] if arms else []
        return [n for n in names if not self.engine.checkpoint_path(n).is_file()]

    def _run(self, command: str, arms: bool) -> dict[str, Any]:
        from .report import write_report

        t0 = time.perf_counter()
        self.validate()
        with self.claimed():
            for note in schedule_warnings(self.cfg):  # after the claim: log.txt keeps it too
                self.log.warning(f"warning: {note}")
            pending = self.pending_stages(arms)  # before any stage runs: does this invocation train anything?
            teacher = self.teacher()
            trained = [teacher]
            source = teacher
            if self.cfg.auxiliary.enabled:
                source = self.auxiliary(teacher.model)
                trained.append(source)
            if not self.cfg.evaluate.sources:
                trained = []
            for arm in resolve_arms(self.cfg) if arms else []:
                trained.append(self.student(arm, source.model))
            results = self.evaluate(trained)
            wall = time.perf_counter() - t0
            return ddp.on_main(lambda: write_report(
                self.run_dir, results, cfg=self.cfg, command=command, wall_time_s=wall,
                data_source=getattr(self.data, "source", None), trained=bool(pending)))

    def train_model(self, command: str = "indistill train") -> tuple[Trained, dict[str, Any]]:
        """``indistill train``: supervised training of ``cfg.model`` on ``cfg.data`` under ``cfg.train``, then
        its evaluation and report in the run directory; returns the trained model and the results dict.

        A finished model (its final checkpoint exists) is loaded, not trained again; the report then keeps
        the wall time and command of the invocation that trained it.
        """
        from .report import write_report

        model = self.seeded_model(self.cfg.model)
        tap_shapes(model, model_taps(model), self.input_shape)  # taps that do not fit: an error before the claim
        with self.claimed():
            fresh = not self.engine.checkpoint_path("model").is_file()
            self.engine.fit(supervised_stage("model", model, self.cfg.train, evaluate=self._evaluator(model),
                                             meta=self.meta(self.cfg.model, "model")))
            trained = Trained("model", model, "model", self.engine.checkpoint_path("model"))
            results = self.evaluate([trained])
            ddp.on_main(lambda: write_report(self.run_dir, results, cfg=self.cfg, command=command,
                                             data_source=getattr(self.data, "source", None), trained=fresh))
        return trained, results
