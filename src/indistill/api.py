"""The library calls behind the ``indistill`` commands that work on a config's models or a run's checkpoints
without running the pipeline (training goes through :class:`~indistill.pipeline.Pipeline`).

- :func:`load_checkpoint_model`, :func:`evaluate_checkpoint`, :func:`evaluate_target`: rebuild a model from
  what its checkpoint records and evaluate it (``indistill evaluate``);
- :func:`load_source`, :func:`load_run`: the models of a trained run directory;
- :func:`prune_report` (``indistill prune``), :func:`pair_report` (``indistill pair``),
  :func:`arm_summaries` (``indistill validate``).

Each returns data (and, where a command prints it, its text); none prints.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import load_weights, safe_load
from .config import Config, ModelSpec, describe_arm, resolve_arms
from .data import DataSplits
from .errors import UserError
from .pairing import TapPairs, pair_taps
from .pipeline import (
    Trained, build_model, count_params, input_shape_of, load_data, source_spec,
)
from .warmup import InDistillWarmup, build_warmup

# -- evaluating checkpoints ----------------------------------------------------------------------------------


def checkpoint_meta(ckpt: Path) -> dict[str, Any]:
    """The ``meta`` a finished checkpoint records (architecture, dataset, role); ``{}`` for safetensors or a
    bare state dict."""
    if ckpt.suffix == ".safetensors":
        return {}
    obj = safe_load(ckpt)
    return obj.get("meta", {}) if isinstance(obj, dict) else {}


def spec_from_meta(meta: dict[str, Any]) -> ModelSpec:
    """The :class:`ModelSpec` a checkpoint's ``meta`` records (its ``arch``, ``kwargs`` and ``taps``)."""
    return ModelSpec(name=meta["arch"], kwargs=dict(meta.get("kwargs") or {}), taps=meta.get("taps") or None)


@dataclass
class CheckpointModel:
    """A checkpoint's model rebuilt and loaded, with the data and config it is evaluated under."""

    checkpoint: Path
    model: nn.Module
    spec: ModelSpec
    data: DataSplits
    meta: dict[str, Any]
    cfg: Config  # the caller's config, with data.name set to the checkpoint's dataset where that was taken


def load_checkpoint_model(ckpt: Path, cfg: Config, *, model_from_config: bool = False,
                          data_from_config: bool = False) -> CheckpointModel:
    """Rebuild the model ``ckpt`` records and load its weights; ``cfg`` is not changed.

    The architecture and dataset come from the checkpoint's ``meta`` unless ``model_from_config`` /
    ``data_from_config`` (the user named them); a checkpoint without ``meta`` needs ``model_from_config``.
    The data's class count must be the checkpoint's.
    """
    meta = checkpoint_meta(ckpt)
    if meta and not model_from_config:
        spec = spec_from_meta(meta)
    elif model_from_config:
        spec = cfg.model
    else:
        raise UserError(f"{ckpt} does not record its architecture; give model.name=... (and model.kwargs)")
    if meta and not data_from_config:
        cfg = replace(cfg, data=replace(cfg.data, name=meta["dataset"]))
    data = load_data(cfg)
    if meta and meta.get("num_classes") not in (None, data.num_classes):
        raise UserError(f"{ckpt} was trained on {meta['num_classes']} classes but {data.name} has "
                        f"{data.num_classes}; give the dataset it was trained on (data.name=...)")
    model = build_model(spec, data)
    load_weights(model, ckpt)
    return CheckpointModel(ckpt, model, spec, data, meta, cfg)


@dataclass
class CheckpointEvaluation:
    """One checkpoint's evaluation: its row of results and the directory its report was written to."""

    name: str  # the checkpoint's stem (``model`` for ``checkpoints/model.pt``)
    checkpoint: Path
    results: dict[str, Any]
    out_dir: Path  # ``<run>/eval/<name>/``: results.json, results.md, plots/


def evaluation_dir(ckpt: Path) -> Path:
    """Where a checkpoint's evaluation goes: ``<run>/eval/<stem>/``, never into the run's own results."""
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run / "eval" / ckpt.name.split(".")[0]


def evaluate_checkpoint(ckpt: Path, cfg: Config, *, model_from_config: bool = False, data_from_config: bool = False,
                        command: str = "") -> CheckpointEvaluation:
    """Top-1, retrieval (``cfg.evaluate``) and the deployment view of one checkpoint (see
    :func:`load_checkpoint_model`), reported in :func:`evaluation_dir`; ``command`` goes into the report."""
    from .deploy import deployment_stats
    from .engine import select_device
    from .evaluate import evaluate_model
    from .models import model_taps
    from .report import write_report

    loaded = load_checkpoint_model(ckpt, cfg, model_from_config=model_from_config, data_from_config=data_from_config)
    model, data, e = loaded.model, loaded.data, loaded.cfg.evaluate
    res = evaluate_model(model, model_taps(model), data, device=select_device(cfg.device),
                         metrics=tuple(e.metrics), protocols=tuple(e.protocols), ks=tuple(e.ks))
    res.update({"role": loaded.meta.get("role", "model"), "model": loaded.spec.name, "params": count_params(model),
                "checkpoint": str(ckpt)})
    res["deployment"] = deployment_stats(model, input_shape_of(data), checkpoint=ckpt, repeats=e.latency_repeats)
    out = evaluation_dir(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, {out.name: res}, cfg=loaded.cfg, command=command, data_source=getattr(data, "source", None))
    return CheckpointEvaluation(out.name, ckpt, res, out)


def evaluation_targets(target: Path) -> list[Path]:
    """The checkpoints ``target`` names: a run directory's finished ones (``checkpoints/*.pt``), or itself."""
    if target.is_dir():
        found = sorted(p for p in (target / "checkpoints").glob("*.pt") if not p.name.endswith(".last.pt"))
        if not found:
            raise UserError(f"{target} has no finished checkpoints (checkpoints/*.pt); give a checkpoint file")
        return found
    if not target.exists():
        raise UserError(f"'{target}' not found; give a run directory or a checkpoint file")
    return [target]


def evaluate_target(target: Path, cfg: Config, *, model_from_config: bool = False, data_from_config: bool = False,
                    command: str = "") -> list[CheckpointEvaluation]:
    """:func:`evaluate_checkpoint` on each of :func:`evaluation_targets` (a run directory or one checkpoint)."""
    return [evaluate_checkpoint(ckpt, cfg, model_from_config=model_from_config, data_from_config=data_from_config,
                                command=command) for ckpt in evaluation_targets(target)]


def evaluation_summary(target: Path, evaluated: list[CheckpointEvaluation], command: str) -> str:
    """A run directory's evaluation as one markdown text: one table of all its checkpoints per protocol,
    the deployment table, and where each checkpoint's own report went."""
    from .deploy import deployment_table
    from .report import protocols_in, results_table

    results = {ev.name: ev.results for ev in evaluated}
    lines = [f"# Evaluation: {target} ({len(results)} checkpoints)\n\nCommand: `{command}`\n"]
    for protocol in protocols_in(results) or ["standard"]:
        label = "standard metrics" if protocol == "standard" else "the authors' evaluation protocol"
        lines.append(f"## Retrieval: {label}\n\n{results_table(results, protocol)}\n")
    lines.append("Top-1 on the test split; retrieval: database = training split, queries = test split; in percent.\n")
    lines.append(f"## Deployment\n\n{deployment_table(results)}\n")
    lines.append(f"written: {target / 'eval'}/<checkpoint>/ (results.json, results.md, plots/) for "
                 f"{', '.join(ev.out_dir.name for ev in evaluated)}")
    return "\n".join(lines)


# -- a trained run's models -----------------------------------------------------------------------------------


def _stage_checkpoint(cfg: Config, spec: ModelSpec, stage: str) -> Path:
    """The checkpoint a stage's model comes from: the config's ``checkpoint``, else the run's final one."""
    return Path(spec.checkpoint) if spec.checkpoint else cfg.run_dir / "checkpoints" / f"{stage}.pt"


@dataclass
class Source:
    """A config's distillation source (:func:`~indistill.pipeline.source_spec`), built, and trained if it can be."""

    role: str  # "auxiliary" or "teacher"
    spec: ModelSpec
    model: nn.Module
    checkpoint: Path  # where its trained weights are (or will be)
    trained: bool  # whether they were there, and loaded
    data: DataSplits  # what it was built for

    def describe(self) -> str:
        """One line: which source this is, and a warning where it is untrained."""
        if self.trained:
            return f"pruning the trained {self.role}: {self.checkpoint}"
        return (f"note: no trained {self.role} yet ({self.checkpoint} missing): pruning an UNTRAINED {self.role}; "
                f"the run prunes its trained {self.role}, whose channels will differ")


def load_source(cfg: Config, data: DataSplits | None = None) -> Source:
    """The source of ``cfg``'s run: loaded from the config's checkpoint or the run's, untrained where neither is;
    built for ``data`` (default: the config's)."""
    data = data if data is not None else load_data(cfg)
    role, spec, stage = source_spec(cfg)
    model = build_model(spec, data)
    ckpt = _stage_checkpoint(cfg, spec, stage)
    trained = ckpt.is_file()
    if trained:
        load_weights(model, ckpt)
    return Source(role, spec, model, ckpt, trained, data)


def load_run(cfg: Config, data: DataSplits | None = None) -> dict[str, Trained]:
    """Every model of ``cfg``'s run directory with a final checkpoint (teacher, auxiliary, student arms),
    rebuilt from the config and loaded, in eval mode; a stage not finished yet is left out."""
    data = data if data is not None else load_data(cfg)
    stages = [("teacher", "teacher", cfg.teacher, _stage_checkpoint(cfg, cfg.teacher, "teacher"))]
    if cfg.auxiliary.enabled:
        stages.append(("auxiliary", "auxiliary", cfg.auxiliary, _stage_checkpoint(cfg, cfg.auxiliary, "auxiliary_pkt")))
    # an arm's trained model is the run's own checkpoint (student.checkpoint is only where the arms started)
    stages += [(arm.name, "student", cfg.student, cfg.run_dir / "checkpoints" / f"{arm.name}.pt")
               for arm in resolve_arms(cfg)]
    out: dict[str, Trained] = {}
    for name, role, spec, ckpt in stages:
        if ckpt.is_file():
            model = build_model(spec, data)
            # as the pipeline loads them: a config's teacher may keep a fresh classifier (teacher.reset_head)
            load_weights(model, ckpt, reset_head=role == "teacher" and bool(spec.checkpoint) and spec.reset_head)
            out[name] = Trained(name, model.eval(), role, ckpt)
    return out


# -- what a config distils -------------------------------------------------------------------------------------


@dataclass
class PruneReport:
    """The channels a config's warmup distils from its source (``indistill prune``)."""

    source: Source
    warmup: InDistillWarmup
    student_epochs: int

    def text(self) -> str:
        """The pruning table, the kept channels per tap and the warmup's schedule."""
        w = self.warmup
        rows = w.table()
        cols = list(rows[0].keys()) if rows else []
        lines = [" | ".join(cols), *(" | ".join(str(r[c]) for c in cols) for r in rows)]
        lines += [f"kept[{tap}] = {kept.tolist()}" for tap, kept in w.pruned.kept.items()]
        lines.append(f"schedule: {w.schedule.describe()} ({w.epochs} of student.train.epochs={self.student_epochs})")
        return "\n".join(lines)

    def record(self) -> dict[str, Any]:
        """The JSON record (``prune --out``): the source's role, whether it was trained, the pruning."""
        return {"source": self.source.role, "trained": self.source.trained, **self.warmup.prune_record()}


def prune_report(cfg: Config, source: Source) -> PruneReport:
    """Prune ``source`` (see :func:`load_source`) to a fresh student of ``cfg`` as ``cfg.warmup`` says."""
    student = build_model(cfg.student, source.data)
    w = build_warmup(cfg.warmup, source.model, student, input_shape_of(source.data))
    return PruneReport(source, w, cfg.student.train.epochs)


@dataclass
class PairReport:
    """The stage pairs a config distils (``indistill pair``)."""

    role: str
    source_name: str
    student_name: str
    data_name: str
    input_shape: tuple[int, ...]
    pairs: TapPairs  # every pair
    used: TapPairs  # those the warmup distils (``warmup.taps``)
    taps: list[str] | None  # ``warmup.taps`` as configured

    def text(self) -> str:
        """The pairs as a table, the YAML block that pins them, and which ones the warmup distils."""
        role = self.role
        return "\n".join([
            f"# Stage pairs: {role} {self.source_name} -> student {self.student_name} "
            f"({self.data_name}, inputs {' x '.join(str(v) for v in self.input_shape)})\n",
            self.pairs.markdown(role), "\nTo pin this pairing, put in the config:\n", self.pairs.yaml(role),
            f"\nThe warmup distils {', '.join(self.used.student_taps)} (warmup.taps: "
            f"{self.taps if self.taps else 'all paired'}).",
        ])

    def check(self) -> None:
        """A pair pruning cannot align: its one-line :class:`UserError` (after the table that shows it)."""
        self.used.check_prunable(self.role)


def pair_report(cfg: Config) -> PairReport:
    """Build ``cfg``'s source and student (untrained) and pair their stage taps as the warmup will."""
    data = load_data(cfg)
    role, spec, _ = source_spec(cfg)
    shape = input_shape_of(data)
    source, student = build_model(spec, data), build_model(cfg.student, data)
    pairs = pair_taps(source, student, shape, pairs=cfg.warmup.pairs, resize=cfg.warmup.resize, role=role)
    return PairReport(role, spec.name, cfg.student.name, data.name, shape, pairs,
                      pairs.restricted(cfg.warmup.taps), cfg.warmup.taps)


# -- validation ---------------------------------------------------------------------------------------------------


def arm_summaries(cfg: Config) -> list[str]:
    """One line per student arm: its warmup, method, parameters, budget and source."""
    role = source_spec(cfg).role
    return [f"arm {arm.name}: warmup={arm.warmup} method={arm.method} params={arm.params or {}} "
            f"({cfg.student.train.epochs} student epochs, source {role}); {describe_arm(arm)}"
            for arm in resolve_arms(cfg)]


