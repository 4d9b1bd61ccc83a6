"""Optimizers and learning-rate schedules by name: the registries behind ``optimizer.name`` and
``scheduler.name``.

The built-ins keep the config's own keys (``adam``, ``adamw``, ``sgd``; ``none``, ``multistep``,
``cosine``). Any other name is looked up in ``torch.optim`` / ``torch.optim.lr_scheduler``
(case-insensitive: ``rmsprop`` -> ``RMSprop``, ``exponentiallr`` or ``exponential`` ->
``ExponentialLR``), with the spec's ``kwargs`` passed on, so a new optimizer needs no code here; a
user's own is one :data:`OPTIMIZERS` registration in a ``plugins:`` module.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .errors import UserError
from .registry import Registry

#: ``build(params, spec) -> Optimizer``; ``spec`` is a :class:`~indistill.config.OptimizerSpec`
OptimizerBuilder = Callable[[list[nn.Parameter], Any], torch.optim.Optimizer]
#: ``build(optimizer, spec, epochs) -> LRScheduler``, stepped once per epoch
SchedulerBuilder = Callable[[torch.optim.Optimizer, Any, int], Any]


def _torch_class(module: Any, base: type, name: str) -> type | None:
    wanted = name.lower()
    for attr in dir(module):
        obj = getattr(module, attr)
        if not (inspect.isclass(obj) and issubclass(obj, base) and obj is not base and not attr.startswith("_")):
            continue
        if attr.lower() in (wanted, wanted + "lr"):
            return obj
    return None


def _call(cls: type, what: str, name: str, *args: Any, **kwargs: Any) -> Any:
    try:
        inspect.signature(cls).bind(*args, **kwargs)
    except TypeError as e:
        raise UserError(f"{what} '{name}' ({cls.__name__}) does not take {sorted(kwargs)}: {str(e)[:160]}; "
                        f"check its kwargs") from None
    try:
        return cls(*args, **kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"{what} '{name}' ({cls.__name__}) rejected its arguments: {str(e)[:200]}") from None


def _torch_optimizer(name: str) -> OptimizerBuilder | None:
    cls = _torch_class(torch.optim, torch.optim.Optimizer, name)
    if cls is None:
        return None

    def build(params: list[nn.Parameter], spec: Any) -> torch.optim.Optimizer:
        kw = {"lr": spec.lr, **({"weight_decay": spec.weight_decay} if spec.weight_decay else {}), **spec.kwargs}
        return _call(cls, "optimizer", name, params, **kw)

    return build


def _torch_scheduler(name: str) -> SchedulerBuilder | None:
    cls = _torch_class(torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler, name)
    if cls is None:
        return None

    def build(opt: torch.optim.Optimizer, spec: Any, _epochs: int) -> Any:
        return _call(cls, "scheduler", name, opt, **spec.kwargs)

    return build


OPTIMIZERS: Registry[OptimizerBuilder] = Registry(
    "optimizer", group="indistill.optimizers", fallback=_torch_optimizer,
    hint="use adam, adamw, sgd, or any torch.optim class by name (e.g. rmsprop)")
SCHEDULERS: Registry[SchedulerBuilder] = Registry(
    "scheduler", group="indistill.schedulers", fallback=_torch_scheduler,
    hint="use none, multistep, cosine, or any torch.optim.lr_scheduler class by name (e.g. exponential)")


@OPTIMIZERS.register("adam")
def _adam(params: list[nn.Parameter], spec: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay, **spec.kwargs)


@OPTIMIZERS.register("adamw")
def _adamw(params: list[nn.Parameter], spec: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, **spec.kwargs)


@OPTIMIZERS.register("sgd")
def _sgd(params: list[nn.Parameter], spec: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
                           nesterov=spec.nesterov, **spec.kwargs)


@SCHEDULERS.register("none")
def _constant(opt: torch.optim.Optimizer, _spec: Any, _epochs: int) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _e: 1.0)


@SCHEDULERS.register("multistep")
def _multistep(opt: torch.optim.Optimizer, spec: Any, _epochs: int) -> Any:
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(spec.milestones), gamma=spec.gamma)


@SCHEDULERS.register("cosine")
def _cosine(opt: torch.optim.Optimizer, _spec: Any, epochs: int) -> Any:
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))


def build_optimizer(params: Iterable[nn.Parameter], spec: Any) -> torch.optim.Optimizer:
    """The optimizer ``spec.name`` over the trainable ``params``."""
    trainable = [p for p in params if p.requires_grad]
    return OPTIMIZERS.get(spec.name)(trainable, spec)


def build_scheduler(opt: torch.optim.Optimizer, spec: Any, epochs: int) -> Any:
    """Per-epoch LR schedule ``spec.name`` (stepped once at the end of each epoch)."""
    return SCHEDULERS.get(spec.name)(opt, spec, epochs)
