"""The one trainer every stage uses: supervised, auxiliary, InDistill warmup, KD.

A stage supplies what is trained and a loss function returning named terms;
the engine does the rest: optimiser and schedule from config, epochs, AMP and
channels_last, progress, ``metrics.jsonl``, an atomic checkpoint every epoch
(model, extra modules, optimiser, scheduler, RNG) and exact resume. Data order
is a function of (seed, epoch), so re-running a killed command ends with the
same weights as an uninterrupted run (bit-identical on CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import distributed as ddp
from .checkpoint import atomic_save, safe_load
from .config import OptimizerSpec, SchedulerSpec, TrainSpec
from .optim import build_optimizer, build_scheduler
from .data.base import Batch, Split
from .errors import UserError, brief

if TYPE_CHECKING:  # a stage only carries them: engine imports neither
    from .pairing import TapPairs
    from .warmup import InDistillWarmup

LossFn = Callable[[Batch, int], dict[str, torch.Tensor]]


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available; asking for an absent CUDA is a ``UserError``.

    Under torchrun (an initialised process group) ``auto``/``cuda`` mean this rank's ``cuda:LOCAL_RANK``.
    """
    if ddp.is_distributed() and ddp.wants_cuda(name):
        return torch.device("cuda", ddp.local_rank())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {brief(name)} requested but CUDA is not available; use device=cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {brief(name)}; use auto, cpu, cuda or cuda:N") from None


#: What emulated bf16 costs, for the warning; the measurement (a 2-core AVX2 CPU, issue 19) is in README.md.
EMULATED_BF16_COST = "ResNet-20 on an AVX2 CPU: 15x slower, README.md"
_emulated_bf16_warned = False


@functools.lru_cache(maxsize=1)
def cpu_capability() -> str:
    """The CPU's vector capability as torch sees it, plus the native-bf16 units it has, e.g. ``"AVX512 AMX"``.

    ``torch.backends.cpu.get_cpu_capability()`` names the kernel tier (``AVX2``, ``AVX512``, ...) but not
    bf16, which an AVX512 CPU without AVX512_BF16 emulates as well: ``torch.cpu``'s probes add
    ``AVX512_BF16`` and ``AMX`` where the CPU has them.
    """
    parts = [str(torch.backends.cpu.get_cpu_capability())]
    for name, probe in (("AVX512_BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported")):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn() and name not in parts[0]:
                parts.append(name)
        except Exception:  # a private probe that changed between torch versions: counted as absent (fp32)
            pass
    return " ".join(parts)


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 natively: CUDA with bf16 support, or a CPU with AVX512_BF16 or AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cap = cpu_capability().upper()
        return "AVX512_BF16" in cap or "AMX" in cap
    return False


def resolve_precision(precision: str | None, device: torch.device | str) -> str | None:
    """``auto`` becomes ``bf16`` where ``device`` runs bf16 natively and ``fp32`` elsewhere; other values
    (``None`` included: a stage inheriting the run's) are returned as given.

    An explicit ``bf16`` on a CPU that emulates it warns once per process with the measured cost.
    """
    global _emulated_bf16_warned
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and torch.device(device).type == "cpu" and not native_bf16(device):
        if not _emulated_bf16_warned:
            _emulated_bf16_warned = True
            warnings.warn(
                f"precision bf16 on a CPU without native bf16 ({cpu_capability()}): autocast emulates it, "
                f"much slower than fp32 ({EMULATED_BF16_COST}); use precision=auto or precision=fp32",
                stacklevel=2,
            )
    return precision


def resolve_config_precision(cfg: Any, device: torch.device | str) -> None:
    """Resolve every ``auto`` precision of ``cfg`` (the run's and each stage's ``TrainSpec``) in place.

    The run directory's ``config.yaml`` and report then record the precision that ran, and a run made
    before ``auto`` existed (recording ``fp32``) still resumes under a config that says ``auto``.
    """
    cfg.precision = resolve_precision(cfg.precision, device)
    seen: set[int] = set()

    def walk(obj: Any) -> None:
        if not dataclasses.is_dataclass(obj) or isinstance(obj, type) or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, TrainSpec):
            obj.precision = resolve_precision(obj.precision, device)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            for item in value if isinstance(value, list) else [value]:
                walk(item)

    walk(cfg)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def second_moment_ratio(opt: torch.optim.Optimizer, stale: list[list[tuple[nn.Parameter, torch.Tensor]]],
                        grad_scale: float = 1.0) -> list[float]:
    """Per parameter group: the median over its tensors of RMS(sqrt(v_hat)) / RMS(gradient).

    ``stale`` holds, per group, each parameter's bias-corrected ``sqrt(v_hat)`` as Adam had it when the
    loss changed; the gradients are the new loss's first batch. A ratio far above 1 means Adam's
    denominators still hold the old loss's scale: its steps are that many times smaller than a
    fresh Adam's (what a reset at the boundary avoids).
    """
    out = []
    for group in stale:
        ratios = []
        for p, denom in group:
            if p.grad is None:
                continue
            g = p.grad.detach().float() / grad_scale
            g_rms = float(g.pow(2).mean().sqrt())
            if g_rms > 0:
                ratios.append(float(denom.pow(2).mean().sqrt()) / g_rms)
        out.append(float(np.median(ratios)) if ratios else math.nan)
    return out


def adam_denominators(opt: torch.optim.Optimizer) -> list[list[tuple[nn.Parameter, torch.Tensor]]] | None:
    """Per group, ``(param, sqrt(v_hat))`` of every parameter Adam has state for; None for other optimizers."""
    groups = []
    for group in opt.param_groups:
        beta2 = group.get("betas", (None, None))[1]
        if beta2 is None:
            return None
        items = []
        for p in group["params"]:
            st = opt.state.get(p, {})
            if "exp_avg_sq" not in st:
                continue
            step = float(st["step"])
            items.append((p, (st["exp_avg_sq"].detach().float() / (1 - beta2 ** step)).sqrt()))
        groups.append(items)
    return groups if any(groups) else None


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


def get_logger(run_dir: Path, *, to_file: bool = True) -> logging.Logger:
    """A logger writing to stderr and (``to_file``) ``run_dir/log.txt``, one per run directory.

    A pipeline logs to stderr only until its run directory is claimed, so a failed start writes nothing;
    a later call with ``to_file=True`` adds the file. Under torchrun only rank 0 writes the file and
    logs progress; the other ranks log warnings and errors only.
    """
    to_file = to_file and ddp.is_main()
    logger = logging.getLogger(f"indistill.run.{Path(run_dir).resolve()}")
    if not logger.handlers:
        logger.setLevel(logging.INFO if ddp.is_main() else logging.WARNING)
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(sh)
        logger.propagate = False
    has_file = any(isinstance(h, logging.FileHandler) for h in logger.handlers)
    if to_file and not has_file:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(run_dir) / "log.txt")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(fh)
    return logger


def derive_seed(seed: int, key: str) -> int:
    """A seed that depends only on ``(seed, key)``: every random draw at a stage's start (its extra
    modules' init, its global RNG) comes from it, whether earlier stages trained in this process or not."""
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, digest])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> 1)


class Callback:
    """Hooks into the engine's loop; subclass and override what you need (called on rank 0 only)."""

    def on_epoch_end(self, stage: "Stage", row: dict[str, Any]) -> None:
        """Called after every epoch with the metrics row (already written to ``metrics.jsonl``)."""

    def on_stage_end(self, stage: "Stage", summary: dict[str, Any]) -> None:
        """Called once when a stage finishes training (not when it is loaded as already finished)."""

    def close(self) -> None:
        """Release resources (files, writers)."""


class TensorBoardLogger(Callback):
    """Scalars of every epoch row to ``<run_dir>/tb`` (``logging.tensorboard: true``)."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "logging.tensorboard=true needs the tensorboard package; pip install 'indistill[tensorboard]'"
            ) from None
        self.writer = SummaryWriter(str(log_dir))

    def on_epoch_end(self, stage: "Stage", row: dict[str, Any]) -> None:
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "epoch":
                self.writer.add_scalar(f"{stage.name}/{k}", v, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@dataclass
class Stage:
    """One training stage.

    ``model`` is the stage's product (saved as ``model`` in its checkpoint);
    ``extra`` holds trainable helpers owned by a loss (regressors, heads,
    memory banks), optimised and checkpointed too; ``frozen`` modules
    (teachers) are kept in eval mode. ``loss_fn(batch, epoch)`` returns named,
    weighted loss terms; their sum is minimised. ``phase(epoch)`` names the
    curriculum phase for the logs; ``evaluate(epoch)`` returns metrics to log.
    ``reset_optimizer_at`` lists epochs (0-based) at whose start the optimizer's
    state (moments) is cleared; the learning-rate schedule is not. ``meta`` is stored in the final checkpoint
    (architecture, dataset, ...), so the checkpoint knows what it holds.
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
    eval_epochs: Callable[[int], bool] | None = None  # which epochs may evaluate (default: all)
    reset_optimizer_at: Sequence[int] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    warmup: InDistillWarmup | None = None  # a student arm's warmup (its pruning record and schedule)
    pairs: TapPairs | None = None  # a student arm's stage pairs (its warmup and KD method read the same)

    def close(self) -> None:
        """Release what the stage holds (forward hooks); the engine calls it once the stage has run."""


@dataclass
class TrainState:
    """What :meth:`Engine.begin` sets up for a stage: optimizer, schedule, scaler and where to start."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    start_epoch: int
    loss_ref: dict[str, float] = field(default_factory=dict)  # first-epoch loss per phase (the loss guard)
    forward: nn.Module | None = None  # the DDP wrapper whose forward runs the stage's loss (torchrun only)
    sync_bn: list[Any] = field(default_factory=list)  # BatchNorms turned into SyncBatchNorm for this stage


class Engine:
    """Runs stages over one dataset's ``train`` split, writing into ``run_dir``.

    Public API: :meth:`fit` (the whole stage, resumable), or :meth:`begin` +
    :meth:`run_epoch` + :meth:`end_epoch` + :meth:`finish` for callers that
    drive the loop themselves (benchmarks).

    Under torchrun (see :mod:`indistill.distributed`) every rank runs the same calls: each trains on
    its slice of every global batch of ``batch_size`` through a DDP wrapper of the stage's trained
    modules, rank 0 alone writes files, and every rank resumes from the same checkpoint.
    ``sync_bn`` turns the trained modules' BatchNorms into SyncBatchNorm for the stage (CUDA only).
    """

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
        callbacks: Sequence[Callback] = (),
        loss_guard: float = 0.0,
        sync_bn: bool = False,
    ):
        self.run_dir = Path(run_dir)
        self.train_split = train_split
        self.batch_size = batch_size
        self.device = torch.device(device)
        # fp32 | bf16 | fp16, or auto: bf16 where the device runs it natively (see resolve_precision)
        self.precision = resolve_precision(precision, self.device) or "fp32"
        self.channels_last = channels_last
        self.seed = seed
        self.progress = progress
        self.log = logger or get_logger(self.run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.callbacks = list(callbacks)
        self.loss_guard = float(loss_guard)
        self.sync_bn = bool(sync_bn)

    # -- paths -------------------------------------------------------------
    def checkpoint_path(self, stage_name: str) -> Path:
        """The finished stage's checkpoint (``{"model": state_dict, "meta": ..., ...}``)."""
        return self.run_dir / "checkpoints" / f"{stage_name}.pt"

    def _last_path(self, stage_name: str) -> Path:
        return self.run_dir / "checkpoints" / f"{stage_name}.last.pt"

    def is_done(self, stage_name: str) -> bool:
        return self.checkpoint_path(stage_name).is_file()

    # -- helpers -----------------------------------------------------------
    def _precision(self, precision: str | None = None) -> str:
        """A stage's precision (``None``: the engine's), with ``auto`` resolved for this device."""
        return resolve_precision(precision, self.device) or self.precision

    def _autocast(self, precision: str | None = None):
        precision = self._precision(precision)
        if precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
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
        if not ddp.is_main():
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def _drop_metrics_after(self, stage_name: str, epoch: int) -> None:
        """On resume, forget rows of epochs the checkpoint does not hold (a kill between row and checkpoint)."""
        if not ddp.is_main() or not self.metrics_path.is_file():
            return
        lines = self.metrics_path.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a row cut by a kill mid-write
            if not (row.get("stage") == stage_name and int(row.get("epoch", 0)) > epoch):
                keep.append(line)
        if len(keep) != len(lines):
            from .checkpoint import atomic_write_text

            atomic_write_text(self.metrics_path, "".join(x + "\n" for x in keep))

    # -- the loop ----------------------------------------------------------
    def fit(self, stage: Stage) -> dict[str, Any]:
        """Train ``stage`` to completion (or load it if already finished); returns its summary."""
        try:
            return self._fit(stage)
        finally:
            stage.close()

    def _fit(self, stage: Stage) -> dict[str, Any]:
        final = self.checkpoint_path(stage.name)
        if ddp.agree(final.is_file(), f"whether {final} exists"):
            self.prepare_stage(stage)
            ckpt = safe_load(final, map_location=self.device)
            stage.model.load_state_dict(ckpt["model"])
            if stage.extra is not None and "extra" in ckpt:
                stage.extra.load_state_dict(ckpt["extra"])
            self.log.info(f"[{stage.name}] already finished: loaded {final}")
            return dict(ckpt.get("summary", {}))
        state = self.begin(stage)
        summary: dict[str, Any] = {}
        for epoch in range(state.start_epoch, stage.train.epochs):
            row = self.run_epoch(stage, epoch, state)
            summary = self.end_epoch(stage, epoch, state, row)
        self.unwrap(state)
        return self.finish(stage, summary)

    def begin(self, stage: Stage) -> TrainState:
        """Prepare the stage: device, optimizer, schedule, scaler; resume from its last epoch if one was saved."""
        params = self.prepare_stage(stage)
        epochs = stage.train.epochs
        opt = build_optimizer(params, stage.optimizer or stage.train.optimizer)
        sched = build_scheduler(opt, stage.scheduler or stage.train.scheduler, epochs)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self._precision(stage.train.precision) == "fp16")
        state = TrainState(opt, sched, scaler, 0)
        last = self._last_path(stage.name)
        if ddp.agree(last.is_file(), f"whether {last} exists"):
            ck = safe_load(last, map_location=self.device)
            stage.model.load_state_dict(ck["model"])
            if stage.extra is not None:
                stage.extra.load_state_dict(ck["extra"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            scaler.load_state_dict(ck["scaler"])
            # Each rank continues its own RNG streams (dropout draws differ between ranks' slices).
            ranks = ck.get("rng_ranks")
            _set_rng_state(ranks[ddp.rank()] if ranks and len(ranks) == ddp.world_size() else ck["rng"])
            state.start_epoch = int(ck["epoch"])
            state.loss_ref = dict(ck.get("loss_ref", {}))
            self._drop_metrics_after(stage.name, state.start_epoch)
            self.log.info(f"[{stage.name}] resuming after epoch {state.start_epoch}/{epochs} from {last}")
        else:
            # The same seed on every rank: identical global RNG streams keep methods that draw from it
            # for the global batch (CRD's negatives) the same on every rank.
            seed_everything(derive_seed(self.seed, stage.name))
            self._drop_metrics_after(stage.name, 0)
        if ddp.is_distributed():
            self._wrap(stage, state)
        return state

    def _wrap(self, stage: Stage, state: TrainState) -> None:
        """DDP over the stage's trained modules (after any resume: DDP starts by broadcasting rank 0's)."""
        if self.sync_bn:
            if self.device.type != "cuda":
                raise UserError("distributed.sync_bn needs CUDA (SyncBatchNorm has no CPU kernel); "
                                "set distributed.sync_bn=false for CPU runs")
            state.sync_bn = ddp.swap_sync_bn(stage.model, stage.extra)
        state.forward = ddp.wrap_ddp(stage.model, stage.extra, stage.loss_fn, self.device)
        k = ddp.world_size()
        self.log.info(f"[{stage.name}] data-parallel over {k} processes: global batch {self.batch_size}, "
                      f"{self.batch_size // k}-{-(-self.batch_size // k)} per process"
                      + (", SyncBatchNorm" if state.sync_bn else ""))

    def end_epoch(self, stage: Stage, epoch: int, state: TrainState, row: dict[str, Any]) -> dict[str, Any]:
        """Step the schedule, evaluate if due, guard the loss, log the row and checkpoint the epoch."""
        epochs = stage.train.epochs
        state.scheduler.step()
        # Rank 0's buffers on every rank: what rank 0 checkpoints, and what every rank evaluates with.
        ddp.broadcast_buffers(stage.model, stage.extra)
        every = stage.train.eval_every
        due = every and ((epoch + 1) % every == 0 or epoch + 1 == epochs)
        if stage.evaluate is not None and due and (stage.eval_epochs is None or stage.eval_epochs(epoch)):
            row.update(stage.evaluate(epoch))
        self._write_metrics(row)
        shown = " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float))
        self.log.info(f"[{stage.name}] epoch {epoch + 1}/{epochs} {row.get('phase', '')} {shown}")
        rng_ranks = ddp.all_gather_object(_rng_state()) if ddp.is_distributed() else None
        if not ddp.is_main():
            return row
        atomic_save(
            {
                "model": stage.model.state_dict(),
                "extra": stage.extra.state_dict() if stage.extra is not None else {},
                "optimizer": state.optimizer.state_dict(),
                "scheduler": state.scheduler.state_dict(),
                "scaler": state.scaler.state_dict(),
                "rng": _rng_state(),
                "epoch": epoch + 1,
                "loss_ref": state.loss_ref,
                **({"rng_ranks": rng_ranks} if rng_ranks is not None else {}),
            },
            self._last_path(stage.name),
        )
        for cb in self.callbacks:
            cb.on_epoch_end(stage, row)
        return row

    def unwrap(self, state: TrainState) -> None:
        """Drop the stage's DDP wrapper and turn its SyncBatchNorms back into plain BatchNorms (the
        trained model is then a plain model again, e.g. as a later stage's frozen source)."""
        ddp.restore_bn(state.sync_bn)
        state.sync_bn, state.forward = [], None

    def finish(self, stage: Stage, summary: dict[str, Any]) -> dict[str, Any]:
        """Write the finished stage's checkpoint (with ``meta``) and drop its per-epoch one.

        Under torchrun rank 0 writes and every rank leaves at a barrier, when the file exists.
        """
        if not ddp.is_main():
            ddp.barrier()
            return summary
        out = {"model": stage.model.state_dict(), "summary": summary, "stage": stage.name,
               "epochs": stage.train.epochs, "meta": dict(stage.meta)}
        if stage.extra is not None:
            out["extra"] = stage.extra.state_dict()
        atomic_save(out, self.checkpoint_path(stage.name))
        self._last_path(stage.name).unlink(missing_ok=True)
        for cb in self.callbacks:
            cb.on_stage_end(stage, summary)
        ddp.barrier()
        return summary

    def _check_loss(self, stage: Stage, epoch: int, state: TrainState, key: str, loss: float,
                    terms: dict[str, torch.Tensor]) -> None:
        """Stop on a non-finite batch loss, or one that exploded (:meth:`_guard`).

        Under torchrun every rank takes the same decision at the same step (the worst rank's
        loss, one small all-reduce): a rank that stopped alone would leave the others waiting in
        the next gradient all-reduce.
        """
        finite = math.isfinite(loss)
        if ddp.is_distributed():
            worst = ddp.all_reduce_max(torch.tensor([0.0 if finite else 1.0, abs(loss) if finite else 0.0],
                                                    dtype=torch.float64))
            if worst[0] > 0 and finite:
                raise UserError(f"[{stage.name}] loss is not finite on another rank at epoch {epoch + 1}; "
                                f"lower the learning rate")
            loss = float(worst[1]) if finite else loss
        if not finite:
            raise UserError(
                f"[{stage.name}] loss is {loss} at epoch {epoch + 1} "
                f"({', '.join(f'{k}={v.item():.3g}' for k, v in terms.items())}); lower the learning rate"
            )
        self._guard(stage, epoch, state, key, loss)

    def _guard(self, stage: Stage, epoch: int, state: TrainState, key: str, loss: float) -> None:
        """Stop a stage whose batch loss exploded: finite, but ``loss_guard`` x the first batch of its phase."""
        ref = state.loss_ref.setdefault(key, abs(loss))
        if self.loss_guard and abs(loss) > self.loss_guard * max(ref, 1e-8):
            raise UserError(
                f"[{stage.name}] loss exploded at epoch {epoch + 1}: {loss:.3g} is {abs(loss) / max(ref, 1e-8):.3g}x its "
                f"phase's first batch ({ref:.3g}); lower the learning rate (or raise loss_guard); "
                f"the last good epoch is kept"
            )

    def run_epoch(self, stage: Stage, epoch: int, state: TrainState, split: Split | None = None) -> dict[str, Any]:
        """One epoch of ``stage`` over ``split`` (default: the engine's train split); returns its metrics row."""
        phase_key = stage.phase(epoch) if stage.phase is not None else ""
        stale, reset = self._begin_epoch(stage, epoch, state, phase_key)
        t0 = time.perf_counter()
        totals, n_seen, ratios = self._steps(stage, epoch, state, split or self.train_split, phase_key, stale)
        if ddp.is_distributed():  # the row reports the whole global epoch, identically on every rank
            keys = list(totals)  # the same terms, in the same order, on every rank
            summed = ddp.all_reduce_sum(torch.tensor([n_seen] + [totals[k] for k in keys], dtype=torch.float64))
            n_seen = int(summed[0])
            totals = dict(zip(keys, summed[1:].tolist()))
        elapsed = time.perf_counter() - t0
        row = self._epoch_row(stage, epoch, state, phase_key, reset, ratios)
        row.update({("loss" if k == "loss" else f"loss/{k}"): v / max(1, n_seen) for k, v in totals.items()})
        row["time_s"] = elapsed
        row["images_per_s"] = n_seen / elapsed if elapsed > 0 else math.nan
        return row

    def _begin_epoch(self, stage: Stage, epoch: int, state: TrainState, phase_key: str
                     ) -> tuple[list[list[tuple[nn.Parameter, torch.Tensor]]] | None, bool]:
        """Before the first step: ``(stale, reset)``, the Adam denominators to compare with the new loss's
        gradients where the loss changes, and whether the optimizer state is cleared now; modes set."""
        # Where the loss changes, measure how stale Adam's second moments are for the new loss (the
        # diagnostic of docs/method.md), before any reset clears them.
        changed = epoch > 0 and stage.phase is not None and stage.phase(epoch - 1) != phase_key
        stale = adam_denominators(state.optimizer) if changed else None
        reset = epoch in stage.reset_optimizer_at
        if reset:
            state.optimizer.state.clear()
        stage.model.train()
        if stage.extra is not None:
            stage.extra.train()
        for m in stage.frozen:
            m.eval()
        return stale, reset

    def _steps(self, stage: Stage, epoch: int, state: TrainState, split: Split, phase_key: str,
               stale: list[list[tuple[nn.Parameter, torch.Tensor]]] | None
               ) -> tuple[dict[str, float], int, list[float] | None]:
        """The epoch's optimizer steps over this rank's batches: ``(totals, n_seen, ratios)``, the loss and
        its terms summed over samples, the samples seen, and the second-moment ratios of the first step
        (where ``stale`` is given)."""
        opt, scaler = state.optimizer, state.scaler
        totals: dict[str, float] = {}
        n_seen = 0
        # (batch, loss weight): this rank's slice of every global batch (the whole batch, weight 1, in one process)
        batches = ddp.shard_batches(split, self.batch_size, seed=self.seed, epoch=epoch, device=self.device)
        total = len(ddp.global_batch_sizes(len(split), self.batch_size, ddp.world_size()))
        bar = tqdm(
            batches, total=total, desc=f"{stage.name} {epoch + 1}/{stage.train.epochs}", leave=False,
            disable=not self.progress or not sys.stderr.isatty(), dynamic_ncols=True,
        )
        forward = state.forward if state.forward is not None else stage.loss_fn
        ratios: list[float] | None = None
        for batch, weight in bar:
            if self.channels_last:
                batch = batch._replace(images=batch.images.contiguous(memory_format=torch.channels_last))
            with self._autocast(stage.train.precision):
                terms = forward(batch, epoch)
            loss = sum(terms.values())
            value = float(loss.detach())
            self._check_loss(stage, epoch, state, phase_key, value, terms)
            opt.zero_grad(set_to_none=True)
            # DDP averages the ranks' gradients; the weight turns that into the global batch's mean.
            scaler.scale(loss * weight if weight != 1.0 else loss).backward()
            if stale is not None and ratios is None:
                ratios = second_moment_ratio(opt, stale, float(scaler.get_scale()) if scaler.is_enabled() else 1.0)
            scaler.step(opt)
            scaler.update()
            bs = batch.labels.shape[0]
            n_seen += bs
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) * bs
            totals["loss"] = totals.get("loss", 0.0) + value * bs
        return totals, n_seen, ratios

    def _epoch_row(self, stage: Stage, epoch: int, state: TrainState, phase_key: str, reset: bool,
                   ratios: list[float] | None) -> dict[str, Any]:
        """The row's head: stage, epoch, phase, learning rate, optimizer reset and second-moment ratios
        (logged where the loss changed)."""
        row: dict[str, Any] = {"stage": stage.name, "epoch": epoch + 1}
        if stage.phase is not None:
            row["phase"] = stage.phase(epoch)
        row["lr"] = float(state.optimizer.param_groups[0]["lr"])
        if reset:
            row["optimizer_reset"] = True
        for i, r in enumerate(ratios or []):
            row[f"adam_vhat_grad_ratio/g{i}"] = r
        if ratios and ddp.is_main():
            self.log.info(f"[{stage.name}] loss changed at epoch {epoch + 1} ({phase_key}): Adam's sqrt(v_hat) is "
                          f"{', '.join(f'{r:.3g}' for r in ratios)}x the new gradient's RMS (median over tensors, per "
                          f"group); optimizer state {'reset' if reset else 'kept'}")
        return row
