"""The one interface every KD method implements, and its registry.

A method is an ``nn.Module``: any extra trainable modules it owns (regressors,
embedding heads) are its submodules and any state (memory banks) its buffers,
so the engine optimises and checkpoints them with the student without knowing
what they are. ``forward`` returns a dict of *named* loss terms, already
weighted; the engine sums them and logs each one.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..data.base import Batch
from ..errors import UserError, suggest
from ..registry import Registry

Shape = tuple[int, ...]


@dataclass
class MethodContext:
    """What a method may know when it is built.

    Shapes exclude the batch dim and cover only the taps the method reads
    (:attr:`Method.uses`): ``embedding`` / ``logits`` are keys exactly when listed
    there (both models must then have them), and ``stage_taps``, the aligned
    intermediate tap names shallow to deep (e.g. ``["stage1", "stage2", "stage3"]``),
    are keys of both dicts when ``"stages"`` is (empty otherwise).
    ``teacher_shapes`` is empty for a method with ``needs_teacher = False``.
    """

    student_shapes: dict[str, Shape]
    teacher_shapes: dict[str, Shape]
    num_classes: int
    num_samples: int = 0
    stage_taps: list[str] = field(default_factory=list)
    epochs: int = 1


class Method(nn.Module):
    """Base class of stage-2 KD methods.

    Subclasses set ``name``, ``paper`` and ``summary``, take their
    hyper-parameters as keyword arguments of ``__init__`` (with defaults: those
    are the documented defaults) after ``ctx``, and implement ``forward``.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: taps read from student/teacher: any of "logits", "embedding", "stages"; only these are
    #: attached and paired (a logit-only method works on any pair of models with logits)
    uses: ClassVar[tuple[str, ...]] = ("logits",)
    #: False for methods that read no teacher tap (``ce``): the teacher is then not run at all
    needs_teacher: ClassVar[bool] = True

    def __init__(self, ctx: MethodContext):
        super().__init__()
        self.ctx = ctx

    def forward(
        self,
        student: Mapping[str, torch.Tensor],
        teacher: Mapping[str, torch.Tensor],
        batch: Batch,
        epoch: int,
    ) -> dict[str, torch.Tensor]:
        """Loss terms for one batch. ``teacher`` tensors are detached; ``epoch`` is 0-based."""
        raise NotImplementedError


def _load() -> None:
    import indistill.methods  # noqa: F401  (its __init__ imports every method file)


METHODS: Registry[type[Method]] = Registry("KD method", loader=_load, group="indistill.methods",
                                           hint="see `indistill methods`")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register a method under ``cls.name`` (a name taken twice is an error)."""
    if not cls.name:
        raise ValueError(f"method class {cls.__name__} needs a `name`")
    return METHODS.add(cls.name, cls)


def list_methods() -> dict[str, type[Method]]:
    return dict(METHODS.items())


def method_params(cls: type[Method]) -> dict[str, Any]:
    """The method's hyper-parameters and their defaults, from ``__init__``'s signature."""
    sig = inspect.signature(cls.__init__)
    return {
        n: p.default
        for n, p in sig.parameters.items()
        if n not in ("self", "ctx") and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def get_method_class(name: str) -> type[Method]:
    """The registered class of ``name``; an unknown name is a one-line ``UserError``."""
    return METHODS.get(name)


def create_method(name: str, ctx: MethodContext, params: Mapping[str, Any] | None = None) -> Method:
    """Build a registered method; unknown names or parameters raise a one-line ``UserError``."""
    cls = get_method_class(name)
    allowed = method_params(cls)
    params = dict(params or {})
    unknown = [k for k in params if k not in allowed]
    if unknown:
        # Name every unknown key: a params block left over from another method has several.
        hints = "".join(suggest(k, allowed) for k in unknown)
        raise UserError(
            f"method '{name}' has no parameter{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(k) for k in unknown)}{hints}; its parameters: {', '.join(allowed) or 'none'} "
            f"(parameters belong to their method: kd.params.{name}.<param> or the arm's params)"
        )
    return cls(ctx, **params)
