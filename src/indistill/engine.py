"""The one trainer every stage uses: supervised, auxiliary, InDistill warmup, KD.

A stage supplies what is trained and a loss function returning named terms;
the engine does the rest: optimiser and schedule from config, epochs, AMP and
channels_last, progress, ``metrics.jsonl``, an atomic checkpoint every epoch
(model, extra modules, optimiser, scheduler, RNG) and exact resume. Data order
is a function of (seed, epoch), so re-running a killed command ends with the
same weights as an uninterrupted run (bit-identical on CPU).
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import atomic_save, safe_load
from .config import OptimizerSpec, SchedulerSpec, TrainSpec
from .data.base import Batch, Split
from .errors import UserError

LossFn = Callable[[Batch, int], dict[str, torch.Tensor]]


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available; asking for an absent CUDA is a ``UserError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available; use device=cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(params: Iterable[nn.Parameter], spec: OptimizerSpec) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.name == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.name == "sgd":
        return torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay, nesterov=spec.nesterov
        )
    raise UserError(f"unknown optimizer '{spec.name}'; use adam, adamw or sgd")


def build_scheduler(opt: torch.optim.Optimizer, spec: SchedulerSpec, epochs: int):
    """Per-epoch LR schedule (stepped once at the end of each epoch)."""
    if spec.name == "none":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _e: 1.0)
    if spec.name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(spec.milestones), gamma=spec.gamma)
    if spec.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    raise UserError(f"unknown scheduler '{spec.name}'; use none, multistep or cosine")


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def get_logger(run_dir: Path) -> logging.Logger:
    """A logger writing to ``run_dir/log.txt`` and stderr (one per run directory)."""
    logger = logging.getLogger(f"indistill.run.{run_dir.resolve()}")
    if not logger.handlers:
        run_dir.mkdir(parents=True, exist_ok=True)
        logger.setLevel(logging.INFO)
        fh = logging.FileHandler(run_dir / "log.txt")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(fh)
        logger.addHandler(sh)
        logger.propagate = False
    return logger


@dataclass
class Stage:
    """One training stage.

    ``model`` is the stage's product (saved as ``model`` in its checkpoint);
    ``extra`` holds trainable helpers owned by a loss (regressors, heads,
    memory banks), optimised and checkpointed too; ``frozen`` modules
    (teachers) are kept in eval mode. ``loss_fn(batch, epoch)`` returns named,
    weighted loss terms; their sum is minimised. ``phase(epoch)`` names the
    curriculum phase for the logs; ``evaluate(epoch)`` returns metrics to log.
    """

    name: str
    model: nn.Module
    loss_fn: LossFn
    train: TrainSpec
    extra: nn.Module | None = None
    frozen: Sequence[nn.Module] = ()
    optimizer: OptimizerSpec | None = None  # defaults to train.optimizer
    scheduler: SchedulerSpec | None = None
    phase: Callable[[int], str] | None = None
    evaluate: Callable[[int], dict[str, float]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Engine:
    """Runs stages over one dataset's ``train`` split, writing into ``run_dir``."""

    def __init__(
        self,
        run_dir: str | Path,
        train_split: Split,
        *,
        batch_size: int = 128,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        channels_last: bool = False,
        seed: int = 0,
        progress: bool = True,
        logger: logging.Logger | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.train_split = train_split
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.precision = precision
        self.channels_last = channels_last
        self.seed = seed
        self.progress = progress
        self.log = logger or get_logger(self.run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"

    # -- paths -------------------------------------------------------------
    def checkpoint_path(self, stage_name: str) -> Path:
        """The finished stage's checkpoint (``{"model": state_dict, ...}``)."""
        return self.run_dir / "checkpoints" / f"{stage_name}.pt"

    def _last_path(self, stage_name: str) -> Path:
        return self.run_dir / "checkpoints" / f"{stage_name}.last.pt"

    def is_done(self, stage_name: str) -> bool:
        return self.checkpoint_path(stage_name).is_file()

    # -- helpers -----------------------------------------------------------
    def _autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _prepare(self, module: nn.Module) -> nn.Module:
        module.to(self.device)
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        return module

    def prepare_stage(self, stage: Stage) -> list[nn.Parameter]:
        """Put the stage's modules on the device (and format), freeze its frozen ones; return what trains."""
        self._prepare(stage.model)
        if stage.extra is not None:
            self._prepare(stage.extra)
        for m in stage.frozen:
            self._prepare(m).eval()
            m.requires_grad_(False)
        return list(stage.model.parameters()) + (list(stage.extra.parameters()) if stage.extra is not None else [])

    def _write_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    # -- the loop ----------------------------------------------------------
    def fit(self, stage: Stage) -> dict[str, Any]:
        """Train ``stage`` to completion (or load it if already finished); returns its summary."""
        final = self.checkpoint_path(stage.name)
        params = self.prepare_stage(stage)
        if final.is_file():
            ckpt = safe_load(final, map_location=self.device)
            stage.model.load_state_dict(ckpt["model"])
            if stage.extra is not None and "extra" in ckpt:
                stage.extra.load_state_dict(ckpt["extra"])
            self.log.info(f"[{stage.name}] already finished: loaded {final}")
            return dict(ckpt.get("summary", {}))

        epochs = stage.train.epochs
        opt = build_optimizer(params, stage.optimizer or stage.train.optimizer)
        sched = build_scheduler(opt, stage.scheduler or stage.train.scheduler, epochs)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        start = 0
        last = self._last_path(stage.name)
        if last.is_file():
            state = safe_load(last, map_location=self.device)
            stage.model.load_state_dict(state["model"])
            if stage.extra is not None:
                stage.extra.load_state_dict(state["extra"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            _set_rng_state(state["rng"])
            start = int(state["epoch"])
            self.log.info(f"[{stage.name}] resuming after epoch {start}/{epochs} from {last}")
        else:
            seed_everything(self.seed)

        summary: dict[str, Any] = {}
        for epoch in range(start, epochs):
            row = self._epoch(stage, epoch, opt, scaler)
            sched.step()
            if stage.evaluate is not None and stage.train.eval_every and (
                (epoch + 1) % stage.train.eval_every == 0 or epoch + 1 == epochs
            ):
                row.update(stage.evaluate(epoch))
            self._write_metrics(row)
            shown = " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float))
            self.log.info(f"[{stage.name}] epoch {epoch + 1}/{epochs} {row.get('phase', '')} {shown}")
            summary = row
            atomic_save(
                {
                    "model": stage.model.state_dict(),
                    "extra": stage.extra.state_dict() if stage.extra is not None else {},
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": _rng_state(),
                    "epoch": epoch + 1,
                },
                last,
            )
        out = {"model": stage.model.state_dict(), "summary": summary, "stage": stage.name, "epochs": epochs}
        if stage.extra is not None:
            out["extra"] = stage.extra.state_dict()
        atomic_save(out, final)
        last.unlink(missing_ok=True)
        return summary

    def _epoch(self, stage: Stage, epoch: int, opt: torch.optim.Optimizer, scaler) -> dict[str, Any]:
        stage.model.train()
        if stage.extra is not None:
            stage.extra.train()
        for m in stage.frozen:
            m.eval()
        totals: dict[str, float] = {}
        n_seen = 0
        t0 = time.perf_counter()
        batches = self.train_split.batches(
            self.batch_size, shuffle=True, seed=self.seed, epoch=epoch, device=self.device, drop_last=False
        )
        total = self.train_split.num_batches(self.batch_size)
        bar = tqdm(
            batches, total=total, desc=f"{stage.name} {epoch + 1}/{stage.train.epochs}", leave=False,
            disable=not self.progress or not sys.stderr.isatty(), dynamic_ncols=True,
        )
        for batch in bar:
            if self.channels_last:
                batch = batch._replace(images=batch.images.contiguous(memory_format=torch.channels_last))
            with self._autocast():
                terms = stage.loss_fn(batch, epoch)
            loss = sum(terms.values())
            if not torch.isfinite(loss.detach()):
                raise UserError(
                    f"[{stage.name}] loss is {loss.item()} at epoch {epoch + 1} "
                    f"({', '.join(f'{k}={v.item():.3g}' for k, v in terms.items())}); lower the learning rate"
                )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            bs = batch.labels.shape[0]
            n_seen += bs
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) * bs
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) * bs
        elapsed = time.perf_counter() - t0
        row: dict[str, Any] = {"stage": stage.name, "epoch": epoch + 1}
        if stage.phase is not None:
            row["phase"] = stage.phase(epoch)
        row["lr"] = float(opt.param_groups[0]["lr"])
        row.update({("loss" if k == "loss" else f"loss/{k}"): v / max(1, n_seen) for k, v in totals.items()})
        row["time_s"] = elapsed
        row["images_per_s"] = n_seen / elapsed if elapsed > 0 else math.nan
        return row
