"""Data-parallel runs under ``torchrun``: process group, rank helpers, batch sharding, the DDP wrapper.

``torchrun --nproc_per_node K -m indistill run CONFIG`` starts K processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR/PORT`` set; :func:`init_from_env` joins them
(NCCL on CUDA, gloo on CPU). Without those variables, or with ``WORLD_SIZE=1``, nothing is
initialised and every helper here is a no-op (rank 0 of 1), so single-process runs are unchanged.

Semantics (what a K-rank run computes):

- every rank walks the SAME seeded permutation of the training split and takes its contiguous
  slice of each global batch (:func:`shard_bounds`), so K ranks with ``data.batch_size=B`` see the
  batches one process with ``B`` sees; per-rank batch is ``B / K``;
- the loss of a rank's slice is weighted ``b_rank * K / b_global`` (1 for equal slices), so DDP's
  gradient average equals the gradient of the global batch mean even for a shorter last batch;
  a last batch with fewer than K samples is skipped (every rank must take the same steps);
- rank 0 writes every file (checkpoints, logs, metrics, results); the others wait at barriers.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError

T = TypeVar("T")

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when absent): what torchrun asked for, initialised or not."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; launch with torchrun") from None


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def wants_cuda(device: str) -> bool:
    """Whether a ``device`` setting (auto | cpu | cuda | cuda:N) resolves to CUDA on this machine."""
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def init_from_env(device: str = "auto") -> bool:
    """Join the torchrun process group if the environment asks for more than one process.

    Idempotent; returns whether this process is part of a multi-process group. The backend is
    NCCL when ``device`` resolves to CUDA (each rank then uses ``cuda:LOCAL_RANK``), gloo otherwise.
    """
    if is_distributed():
        return True
    if env_world_size() <= 1:
        return False
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise UserError(f"WORLD_SIZE>1 but {', '.join(missing)} not set; launch with torchrun --nproc_per_node K")
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed; run in one process (without torchrun)")
    if device.startswith("cuda:"):
        raise UserError(f"device={device} under torchrun would put every rank on one GPU; "
                        f"use device=auto or cuda (rank r uses cuda:LOCAL_RANK)")
    cuda = wants_cuda(device)
    if cuda:
        if not torch.cuda.is_available():
            raise UserError(f"device '{device}' requested but CUDA is not available; use device=cpu")
        if local_rank() >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={local_rank()} but only {torch.cuda.device_count()} GPU(s) visible; "
                            f"use --nproc_per_node <= {torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank())
    backend = "nccl" if cuda else "gloo"
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart > 0:
        # torchrun keeps its store across `--max-restarts` rounds, and the previous round's keys (gloo's
        # listening addresses among them) would send this round's ranks to dead peers: a fresh namespace.
        store, rank_, world = next(dist.rendezvous("env://"))
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f"indistill/restart{restart}", store),
                                rank=rank_, world_size=world)
    else:
        dist.init_process_group(backend=backend)
    atexit.register(shutdown)
    return True


def shutdown() -> None:
    """Leave the process group (at exit), so NCCL does not warn about an undestroyed group."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collective tensors must live: the rank's GPU under NCCL, CPU under gloo."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor on ``t``'s device; ``t`` itself when not distributed)."""
    if not is_distributed():
        return t
    buf = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buf)
    return buf.to(t.device)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise max of ``t`` over ranks (a new tensor on ``t``'s device; ``t`` itself when not distributed)."""
    if not is_distributed():
        return t
    buf = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return buf.to(t.device)


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0, in rank order; ranks may hold different row counts."""
    if not is_distributed():
        return t
    dev = _comm_device()
    n = torch.tensor([t.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    top = max(counts)
    # all_gather needs equal shapes: pad to the largest slice, cut after.
    buf = torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=dev)
    buf[: t.shape[0]] = t.detach().to(dev)
    parts = [torch.empty_like(buf) for _ in counts]
    dist.all_gather(parts, buf)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)


def rows_before(n: int) -> int:
    """How many rows the lower ranks hold when each rank holds ``n`` (this rank's offset in an
    :func:`all_gather_cat` of those rows)."""
    if not is_distributed():
        return 0
    counts = all_gather_cat(torch.tensor([n], device=_comm_device()))
    return int(counts[: rank()].sum())


def all_gather_object(obj: T) -> list[T]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(value: Any, what: str) -> Any:
    """Check that every rank computed the same ``value`` (e.g. what it found on disk); a
    disagreement means ranks do not share a filesystem, which would deadlock later."""
    values = all_gather_object(value)
    if any(v != values[0] for v in values):
        raise UserError(f"ranks disagree on {what} ({values}); every rank must see the same run directory "
                        f"(a shared filesystem on multi-node runs)")
    return value


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank; a ``UserError`` it raises is
    raised on every rank (so the other ranks stop instead of waiting at the next collective)."""
    if not is_distributed():
        return fn()
    result: tuple[bool, Any] = (True, None)
    if is_main():
        try:
            result = (True, fn())
        except UserError as e:
            result = (False, str(e))
        except BaseException as e:  # noqa: BLE001 - tell the others, then fail as usual
            broadcast_object((False, f"rank 0 failed: {type(e).__name__}: {e}"))
            raise
    ok, value = broadcast_object(result)
    if not ok:
        raise UserError(value)
    return value


def broadcast_buffers(*modules: nn.Module | None) -> None:
    """Copy rank 0's buffers (BatchNorm statistics, memory banks) to every rank.

    DDP runs without per-step buffer broadcasts (``broadcast_buffers=False``: a CRD memory bank
    would be re-sent every step); calling this at each epoch end gives every rank the state that
    rank 0 checkpoints, so evaluation and a resumed run see the same buffers on every rank.
    """
    if not is_distributed():
        return
    for m in modules:
        if m is None:
            continue
        for b in m.buffers():
            if b.device.type == _comm_device().type:
                dist.broadcast(b, src=0)
            else:
                tmp = b.to(_comm_device())
                dist.broadcast(tmp, src=0)
                b.copy_(tmp)


# ----------------------------------------------------------------------------- sharding


def shard_bounds(n: int, rank_: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a global batch of ``n`` that rank ``rank_`` of ``world`` takes (contiguous,
    sizes differ by at most one, in rank order so that concatenating the slices gives the batch)."""
    return rank_ * n // world, (rank_ + 1) * n // world


def global_batch_sizes(n: int, batch_size: int, world: int) -> list[int]:
    """Sizes of the global batches a ``world``-rank epoch over ``n`` samples trains on (the last
    batch is skipped when it cannot give every rank a sample)."""
    sizes = [min(batch_size, n - s) for s in range(0, n, batch_size)]
    return [b for b in sizes if b >= world]


def slice_batch(batch: Any, rank_: int, world: int) -> Any:
    """This rank's rows of a global ``Batch`` (the fallback for splits that cannot shard themselves)."""
    lo, hi = shard_bounds(batch.labels.shape[0], rank_, world)
    return type(batch)(*(t[lo:hi] for t in batch))


def rank_slices(split: Any, batch_size: int, **kw: Any) -> Iterator[Any]:
    """This rank's slice of every global batch of ``split`` (one item per global batch, possibly
    empty). Splits with ``shardable = True`` (in-memory, ImageFolder) load only the rank's rows;
    any other :class:`~indistill.data.base.Split` is loaded whole and sliced."""
    r, k = rank(), world_size()
    if k == 1:
        return split.batches(batch_size, **kw)
    if getattr(split, "shardable", False):
        return split.batches(batch_size, rank=r, world=k, **kw)
    return (slice_batch(b, r, k) for b in split.batches(batch_size, **kw))


def shard_batches(split: Any, batch_size: int, *, seed: int, epoch: int, device: torch.device,
                  shuffle: bool = True) -> Iterator[tuple[Any, float]]:
    """Training batches: this rank's slice of every global batch, with its loss weight
    ``b_rank * K / b_global``; a global batch smaller than K is skipped on every rank."""
    k = world_size()
    n = len(split)
    it = rank_slices(split, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, device=device, drop_last=False)
    for start, batch in zip(range(0, n, batch_size), it):
        b_global = min(batch_size, n - start)
        if b_global < k:
            continue
        yield batch, batch.labels.shape[0] * k / b_global


# ----------------------------------------------------------------------------- DDP


class StageModule(nn.Module):
    """What DDP wraps: a stage's trained modules (``model`` + ``extra``), its forward the stage's loss.

    The loss function calls the student (through its Taps hooks) and the method's extras directly:
    those are the very modules registered here, so DDP's forward (which arms the gradient
    all-reduce) runs around every call that builds the graph, and hooks by module path still find
    the inner modules. Frozen modules (teachers) are not registered, hence never wrapped.
    """

    def __init__(self, model: nn.Module, extra: nn.Module | None, loss_fn: Callable[..., Any]):
        super().__init__()
        self.model = model
        self.extra = extra
        self._loss_fn = loss_fn

    def forward(self, batch: Any, epoch: int) -> dict[str, torch.Tensor]:
        return self._loss_fn(batch, epoch)


def wrap_ddp(model: nn.Module, extra: nn.Module | None, loss_fn: Callable[..., Any],
             device: torch.device) -> nn.Module:
    """DDP over ``StageModule(model, extra, loss_fn)``.

    ``find_unused_parameters``: an arm's method extras sit idle during its warmup epochs and a
    warmup phase's loss reaches only the student's first layers. ``broadcast_buffers=False``: see
    :func:`broadcast_buffers`.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(
        StageModule(model, extra, loss_fn),
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,
        broadcast_buffers=False,
    )


def swap_sync_bn(*modules: nn.Module | None) -> list[tuple[nn.Module, type]]:
    """Turn every BatchNorm of ``modules`` into ``SyncBatchNorm`` in place; returns what to undo.

    In place (the object's class changes; parameters, buffers and forward hooks stay) instead of
    ``convert_sync_batchnorm``, which builds new modules: taps hooked on a BN module, and the
    optimizer's parameter list, would lose track of those.
    """
    if not is_distributed():
        return []
    from torch.nn.modules.batchnorm import _BatchNorm

    swapped: list[tuple[nn.Module, type]] = []
    for m in modules:
        if m is None:
            continue
        for sub in m.modules():
            if isinstance(sub, _BatchNorm) and not isinstance(sub, nn.SyncBatchNorm):
                swapped.append((sub, type(sub)))
                sub.__class__ = nn.SyncBatchNorm
                sub.process_group = None  # the default (whole) group
    return swapped


def restore_bn(swapped: list[tuple[nn.Module, type]]) -> None:
    """Undo :func:`swap_sync_bn` (the finished model is a plain model again, e.g. for a later frozen use)."""
    for sub, cls in swapped:
        sub.__class__ = cls
        if hasattr(sub, "process_group"):
            del sub.process_group
