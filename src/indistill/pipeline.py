"""The InDistill pipeline: teacher -> (auxiliary) -> warmup -> KD -> evaluate.

Each stage is a call of the one :class:`~indistill.engine.Engine`; each reads
the previous stage's checkpoint and writes its own, so re-running the same
command skips finished stages and resumes an unfinished one.

Several student *arms* (e.g. cross-entropy only, PKT only, InDistill + PKT)
can share one teacher and auxiliary; with ``budget: equal`` an arm without the
warmup trains its KD stage for ``warmup.epochs`` more epochs, so every arm
gets the same total number of epochs.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import export_safetensors, load_weights, safe_load
from .config import ArmSpec, Config, ModelSpec, TrainSpec, dump_config, to_dict
from .curriculum import Schedule, default_schedule
from .data import DataSplits, get_dataset
from .engine import Engine, Stage, get_logger, select_device
from .errors import UserError
from .models import Taps, create_model, model_taps
from .models.taps import OUTPUT

STAGE_PREFIX = "stage"


def load_data(cfg: Config) -> DataSplits:
    d = cfg.data
    return get_dataset(d.name, root=d.root, download=d.download, train_subset=d.train_subset, test_subset=d.test_subset)


def build_model(spec: ModelSpec, data: DataSplits) -> nn.Module:
    """A zoo model by name, or a user factory ``package.module:function`` (taps from ``spec.taps``)."""
    if ":" in spec.name:
        mod_name, fn_name = spec.name.split(":", 1)
        try:
            factory = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise UserError(f"cannot import model factory '{spec.name}' ({e}); give module.path:function") from None
        model = factory(num_classes=data.num_classes, in_channels=data.in_channels, **spec.kwargs)
        model.indistill_name = spec.name
        if not spec.taps:
            raise UserError(
                f"model '{spec.name}' is not from the zoo: name its taps in the config "
                f"(taps: {{stage1: layer1, embedding: 'fc:in', logits: '@output'}})"
            )
    else:
        model = create_model(spec.name, num_classes=data.num_classes, in_channels=data.in_channels, **spec.kwargs)
    if spec.taps:
        taps = dict(getattr(model, "indistill_taps", {}) or {})
        taps.update(spec.taps)
        taps.setdefault("logits", OUTPUT)
        model.indistill_taps = taps
    return model


def stage_taps(model: nn.Module) -> list[str]:
    """The intermediate tap names of a model, shallow to deep."""
    return [k for k in model_taps(model) if k not in ("embedding", "logits")]


def default_pairs(teacher: nn.Module, student: nn.Module, explicit: dict[str, str] | None) -> dict[str, str]:
    """Teacher tap -> student tap: ``explicit`` or the stage taps both models share by name."""
    t_taps, s_taps = model_taps(teacher), model_taps(student)
    if explicit:
        for t, s in explicit.items():
            if t not in t_taps:
                raise UserError(f"warmup.pairs: teacher has no tap '{t}'; its taps: {', '.join(t_taps)}")
            if s not in s_taps:
                raise UserError(f"warmup.pairs: student has no tap '{s}'; its taps: {', '.join(s_taps)}")
        return dict(explicit)
    shared = [t for t in stage_taps(teacher) if t in stage_taps(student)]
    if not shared:
        raise UserError(
            "teacher and student share no stage tap names; give warmup.pairs "
            f"(teacher taps: {', '.join(stage_taps(teacher))}; student taps: {', '.join(stage_taps(student))})"
        )
    return {t: t for t in shared}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class Trained:
    """A model the pipeline produced, with its role and where it came from."""

    name: str
    model: nn.Module
    role: str
    checkpoint: Path


class Pipeline:
    """Runs the stages of one config in its run directory."""

    def __init__(self, cfg: Config, *, data: DataSplits | None = None, check_config: bool = True):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.device = select_device(cfg.device)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log = get_logger(self.run_dir)
        if check_config:
            self._check_config()
        self.data = data or load_data(cfg)
        self.input_shape = (self.data.in_channels, self.data.image_size, self.data.image_size)
        self.engine = Engine(
            self.run_dir, self.data.train, batch_size=cfg.data.batch_size, device=self.device,
            precision=cfg.precision, channels_last=cfg.channels_last, seed=cfg.seed, progress=cfg.progress,
            logger=self.log,
        )

    def build_model(self, spec: ModelSpec) -> nn.Module:
        """Build ``spec`` on the run's device, initialised from ``cfg.seed`` (a re-run builds the same weights)."""
        torch.manual_seed(self.cfg.seed)
        return build_model(spec, self.data).to(self.device)

    # -- bookkeeping ---------------------------------------------------------
    _VOLATILE = ("progress", "device", "evaluate")

    def _check_config(self) -> None:
        """Refuse to mix stages of two different configs in one run directory."""
        path = self.run_dir / "config.yaml"
        new = to_dict(self.cfg)
        if path.is_file():
            import yaml

            old = yaml.safe_load(path.read_text()) or {}
            diff = [k for k in new if k not in self._VOLATILE and old.get(k) != new[k]]
            if diff:
                raise UserError(
                    f"{self.run_dir} holds a run with a different config (differs in: {', '.join(diff)}); "
                    f"use another name=... or delete that directory"
                )
        path.write_text(dump_config(self.cfg))

    def _eval_fn(self, model: nn.Module):
        def fn(_epoch: int) -> dict[str, float]:
            from .evaluate import classification_metrics, extract_features

            feats = extract_features(
                model, model_taps(model), self.data.test, device=self.device, batch_size=self.cfg.data.eval_batch_size
            )
            m = classification_metrics(feats["logits"], feats["labels"])
            return {f"test_{k}": float(v) for k, v in m.items()}

        return fn

    # -- stages --------------------------------------------------------------
    def supervised(self, name: str, model: nn.Module, train: TrainSpec) -> None:
        """Cross-entropy training of ``model`` (the teacher, the auxiliary's first stage, a CE baseline)."""

        def loss_fn(batch, _epoch):
            return {"ce": F.cross_entropy(model(batch.images), batch.labels)}

        self.engine.fit(Stage(name, model, loss_fn, train, evaluate=self._eval_fn(model)))

    def teacher(self) -> Trained:
        spec = self.cfg.teacher
        model = self.build_model(spec)
        if spec.checkpoint:
            load_weights(model, spec.checkpoint)
            self.log.info(f"[teacher] loaded {spec.checkpoint}")
            return Trained("teacher", model, "teacher", Path(spec.checkpoint))
        self.supervised("teacher", model, spec.train)
        return Trained("teacher", model, "teacher", self.engine.checkpoint_path("teacher"))

    def auxiliary(self, teacher: nn.Module) -> Trained:
        """Stage 0: the auxiliary trains with cross-entropy, then learns the teacher's embedding by PKT."""
        from .methods import pkt_loss

        spec = self.cfg.auxiliary
        aux = self.build_model(spec)
        if spec.checkpoint:
            load_weights(aux, spec.checkpoint)
            return Trained("auxiliary", aux, "auxiliary", Path(spec.checkpoint))
        self.supervised("auxiliary_ce", aux, spec.ce)
        t_taps = Taps(teacher, {"embedding": model_taps(teacher)["embedding"]})
        a_taps = Taps(aux, {"embedding": model_taps(aux)["embedding"]})

        def loss_fn(batch, _epoch):
            with torch.no_grad():
                _, t = t_taps(batch.images)
            _, a = a_taps(batch.images)
            return {"pkt": pkt_loss(a["embedding"], t["embedding"], variant=spec.pkt_variant)}

        try:
            self.engine.fit(Stage("auxiliary_pkt", aux, loss_fn, spec.pkt, frozen=[teacher], evaluate=self._eval_fn(aux)))
        finally:
            t_taps.remove()
            a_taps.remove()
        return Trained("auxiliary", aux, "auxiliary", self.engine.checkpoint_path("auxiliary_pkt"))

    def schedule(self, student: nn.Module, pairs: dict[str, str]) -> Schedule:
        w = self.cfg.warmup
        taps = w.taps or [s for s in stage_taps(student) if s in pairs.values()]
        missing = [t for t in taps if t not in pairs.values()]
        if missing:
            raise UserError(f"warmup.taps {missing} have no teacher tap paired in warmup.pairs; pair them or drop them")
        return default_schedule(
            taps, a=w.a, total_epochs=w.epochs, phase_epochs=w.phase_epochs, tap_loss=w.tap_loss,
            embedding_loss=w.embedding_loss,
        )

    def warmup(self, arm: ArmSpec, teacher: nn.Module, student: nn.Module) -> None:
        """Stage 1: the InDistill curriculum (pruned teacher targets, one tap at a time)."""
        from .methods import pkt_loss
        from .prune import prune_to_student

        w = self.cfg.warmup
        pairs = default_pairs(teacher, student, w.pairs)
        schedule = self.schedule(student, pairs)
        used = {p.tap for p in schedule}
        pairs = {t: s for t, s in pairs.items() if s in used}
        pruned = prune_to_student(
            teacher, student, pairs, importance=w.importance, producers=w.producers or None,
            input_shape=self.input_shape, resize=w.resize,
        )
        self._write_prune_table(arm.name, pruned)
        self.log.info(f"[{arm.name}.warmup] schedule {schedule.describe()}")
        s_taps = Taps(student, model_taps(student))

        def loss_fn(batch, epoch):
            phase = schedule.phase_at(epoch)
            with torch.no_grad():
                target = pruned(batch.images)
            _, s = s_taps(batch.images)
            if phase.loss == "mse":
                return {f"mse/{phase.tap}": F.mse_loss(s[phase.tap].flatten(1), target[phase.tap].flatten(1))}
            variant = "original" if phase.loss == "pkt_original" else "reference"
            return {f"pkt/{phase.tap}": pkt_loss(s[phase.tap], target["embedding"], variant=variant)}

        train = TrainSpec(epochs=schedule.total, optimizer=w.optimizer, scheduler=w.scheduler, eval_every=0)
        try:
            self.engine.fit(
                Stage(f"{arm.name}.warmup", student, loss_fn, train, frozen=[pruned],
                      phase=lambda e: f"{schedule.phase_at(e).tap}:{schedule.phase_at(e).loss}")
            )
        finally:
            s_taps.remove()

    def _write_prune_table(self, arm: str, pruned: Any) -> None:
        rows = pruned.table()
        (self.run_dir / f"prune_{arm}.json").write_text(
            json.dumps({"rows": rows, "kept": {k: v.tolist() for k, v in pruned.kept.items()}}, indent=1, default=str)
        )

    def kd(self, arm: ArmSpec, teacher: nn.Module, student: nn.Module, epochs: int) -> None:
        """Stage 2: the baseline KD method (or cross-entropy alone for ``method: ce``)."""
        train = TrainSpec(
            epochs=epochs, optimizer=self.cfg.kd.train.optimizer, scheduler=self.cfg.kd.train.scheduler,
            eval_every=self.cfg.kd.train.eval_every,
        )
        name = f"{arm.name}.kd"
        if arm.method == "ce":
            self.supervised(name, student, train)
            return
        method, t_want, s_want = self._method(arm, teacher, student, epochs)
        t_taps, s_taps = Taps(teacher, t_want), Taps(student, s_want)

        def loss_fn(batch, epoch):
            with torch.no_grad():
                _, t = t_taps(batch.images)
            _, s = s_taps(batch.images)
            return method(s, {k: v.detach() for k, v in t.items()}, batch, epoch)

        try:
            self.engine.fit(Stage(name, student, loss_fn, train, extra=method, frozen=[teacher],
                                  evaluate=self._eval_fn(student)))
        finally:
            t_taps.remove()
            s_taps.remove()

    def _method(self, arm: ArmSpec, teacher: nn.Module, student: nn.Module, epochs: int):
        """Build the arm's KD method and the teacher/student tap specs it reads."""
        from .methods import MethodContext, create_method
        from .models import tap_shapes

        pairs = default_pairs(teacher, student, self.cfg.warmup.pairs)
        t_specs, s_specs = model_taps(teacher), model_taps(student)
        t_want = {s: t_specs[t] for t, s in pairs.items()}
        s_want = {s: s_specs[s] for s in pairs.values()}
        for k in ("embedding", "logits"):
            t_want[k], s_want[k] = t_specs[k], s_specs[k]
        ctx = MethodContext(
            student_shapes=tap_shapes(student, s_want, self.input_shape),
            teacher_shapes=tap_shapes(teacher, t_want, self.input_shape),
            num_classes=self.data.num_classes,
            num_samples=len(self.data.train),
            stage_taps=[s for s in stage_taps(student) if s in pairs.values()],
            epochs=epochs,
        )
        params = dict(self.cfg.kd.params) if arm.method == self.cfg.kd.method else {}
        params.update(arm.params)
        return create_method(arm.method, ctx, params).to(self.device), t_want, s_want

    def validate(self) -> None:
        """Check taps, widths, schedules and methods on untrained models before any training starts."""
        from .models import tap_shapes
        from .prune import prune_to_student

        with torch.random.fork_rng(devices=[]):
            models = {"teacher": build_model(self.cfg.teacher, self.data), "student": build_model(self.cfg.student, self.data)}
            if self.cfg.auxiliary.enabled:
                models["auxiliary"] = build_model(self.cfg.auxiliary, self.data)
            for role, m in models.items():
                try:
                    tap_shapes(m, model_taps(m), self.input_shape)
                except UserError as e:
                    raise UserError(f"{role} taps: {e}") from None
            source = models.get("auxiliary", models["teacher"])
            arms = self.arms()
            if self.cfg.kd.method != "ce" and self.cfg.kd.method not in {a.method for a in arms}:
                arms.append(ArmSpec(name="kd", warmup="none", method=self.cfg.kd.method))  # kd.params are checked too
            for arm in arms:
                if arm.warmup == "indistill":
                    pairs = default_pairs(source, models["student"], self.cfg.warmup.pairs)
                    schedule = self.schedule(models["student"], pairs)
                    used = {p.tap for p in schedule}
                    prune_to_student(
                        source, models["student"], {t: s for t, s in pairs.items() if s in used},
                        importance=self.cfg.warmup.importance, producers=self.cfg.warmup.producers or None,
                        input_shape=self.input_shape, resize=self.cfg.warmup.resize,
                    )
                if arm.method != "ce":
                    self._method(arm, source, models["student"], 1)

    def arms(self) -> list[ArmSpec]:
        if self.cfg.arms:
            names = [a.name for a in self.cfg.arms]
            if len(set(names)) != len(names):
                raise UserError(f"arms need distinct names, got {names}")
            return list(self.cfg.arms)
        return [ArmSpec(name="student", warmup=self.cfg.warmup.mode, method=self.cfg.kd.method)]

    def student(self, arm: ArmSpec, teacher: nn.Module) -> Trained:
        student = self.build_model(self.cfg.student)  # seeded: every arm starts from the same initial student
        kd_epochs = self.cfg.kd.train.epochs
        if arm.warmup == "indistill":
            self.warmup(arm, teacher, student)
        elif self.cfg.budget == "equal":
            kd_epochs += self.cfg.warmup.epochs
        if kd_epochs > 0:
            self.kd(arm, teacher, student, kd_epochs)
        export_safetensors(
            student, self.run_dir / "export" / f"{arm.name}.safetensors",
            metadata={"model": self.cfg.student.name, "arm": arm.name, "warmup": arm.warmup, "method": arm.method},
        )
        return Trained(arm.name, student, "student", self.engine.checkpoint_path(f"{arm.name}.kd"))

    # -- evaluation ----------------------------------------------------------
    def evaluate(self, models: list[Trained], cache: bool = True) -> dict[str, Any]:
        """Top-1 and retrieval of each model; results are cached per model in ``eval/``."""
        from .evaluate import evaluate_model

        e = self.cfg.evaluate
        out: dict[str, Any] = {}
        cache_dir = self.run_dir / "eval"
        cache_dir.mkdir(exist_ok=True)
        for t in models:
            cached = cache_dir / f"{t.name}.json"
            if cache and cached.is_file():
                out[t.name] = json.loads(cached.read_text())
                continue
            self.log.info(f"[evaluate] {t.name}")
            res = evaluate_model(
                t.model, model_taps(t.model), self.data, device=self.device, metrics=tuple(e.metrics),
                protocols=tuple(e.protocols), ks=tuple(e.ks),
            )
            res.update({"role": t.role, "model": getattr(t.model, "indistill_name", type(t.model).__name__),
                        "params": count_params(t.model)})
            cached.write_text(json.dumps(res))
            out[t.name] = res
        return out

    def run(self, command: str = "indistill run") -> dict[str, Any]:
        """All stages, then evaluation and the report; returns the results dict."""
        from .report import write_report

        t0 = time.perf_counter()
        self.validate()
        teacher = self.teacher()
        trained = [teacher]
        source = teacher
        if self.cfg.auxiliary.enabled:
            aux = self.auxiliary(teacher.model)
            trained.append(aux)
            source = aux
        for arm in self.arms():
            trained.append(self.student(arm, source.model))
        results = self.evaluate(trained)
        wall = time.perf_counter() - t0
        return write_report(self.run_dir, results, cfg=self.cfg, command=command, wall_time_s=wall)
