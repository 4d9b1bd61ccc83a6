"""Taps found, not typed: the stage taps, embedding and logits of any ``nn.Module`` from one dry forward.

For a model without registered taps (a timm or torchvision model by name, a user's factory without
``taps``), :func:`discover_taps` runs ONE eval-mode, no-grad forward at the data's real input size with
a hook on every module and records the (C, H, W) of every module output. Then:

- **stages**: the module outputs are grouped by *downsampling level* (how many times the map has been
  halved since the input; an unpadded 3x3 conv that takes 15x15 to 13x13 is no level of its own), and
  each level's stage tap is the LAST module output at that level, ordered shallow to deep and named
  ``stage1``..``stageN``. Outputs after the global pooling (the head) are not stages; neither is the
  inside of a downsampling block before its stride (a MobileNet block's expansion at the old
  resolution), a module called more than once (a tap would see only its last call), an output that a
  later in-place op overwrites, nor a container spanning several levels (``features``): where several
  modules return the same tensor, the outermost one that spans one level names the tap (``layer1``,
  not ``layer1.1``);
- **embedding**: the input of the last ``nn.Linear`` executed (``"<path>:in"``), the classifier's input;
- **logits**: ``"@output"``.

A timm model with ``feature_info`` uses its feature modules as the stage candidates instead (the same
grouping and naming; the dry forward still gives every shape at the data's input size).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError, brief
from .taps import OUTPUT

__all__ = ["ModuleOutput", "Trace", "discover_taps", "resolve_taps", "trace_model"]

Res = tuple[int, int]

# Global pooling starts the head: nothing executed from there on is a stage.
_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)


@dataclass
class ModuleOutput:
    """One module call of the dry forward, in completion order (a container completes after its children)."""

    path: str
    kind: str  # the module's class name
    index: int  # completion order
    in_shape: tuple[int, ...] | None  # first positional input, without the batch dim
    out_shape: tuple[int, ...] | None  # None when the output is not a tensor
    input_from_module: bool  # the input tensor was some module's output (not the model input or a functional op)
    global_pool: bool
    mutated: bool = False  # an in-place op changed the output after the module returned it

    @property
    def res(self) -> Res | None:
        return tuple(self.out_shape[1:3]) if self.out_shape is not None and len(self.out_shape) == 3 else None  # type: ignore[return-value]

    @property
    def in_res(self) -> Res | None:
        return tuple(self.in_shape[1:3]) if self.in_shape is not None and len(self.in_shape) == 3 else None  # type: ignore[return-value]


@dataclass
class Trace:
    """Every module call of one dry forward, plus what the model returned."""

    input_shape: tuple[int, ...]
    calls: list[ModuleOutput]
    output_shape: tuple[int, ...] | None
    counts: dict[str, int] = field(default_factory=dict)  # path -> number of calls
    last_linear: str | None = None  # the last nn.Linear executed (the classifier)

    def shape_of(self, path: str) -> tuple[int, ...] | None:
        for c in reversed(self.calls):
            if c.path == path:
                return c.out_shape
        return None


def _is_global_pool(module: nn.Module, out: object) -> bool:
    if isinstance(module, _GLOBAL_POOLS):
        return True
    # timm's SelectAdaptivePool2d / AdaptiveAvgMaxPool2d and similar heads by name
    name = type(module).__name__
    return "AdaptivePool" in name or "AdaptiveAvgMaxPool" in name or "GlobalPool" in name


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def trace_model(model: nn.Module, input_shape: Sequence[int]) -> Trace:
    """One eval-mode, no-grad forward of a zeros batch of ``input_shape`` (C, H, W), recording every module call."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[ModuleOutput] = []
    counts: dict[str, int] = {}
    produced: dict[int, torch.Tensor] = {}  # tensor id -> tensor (kept alive so that ids are not reused)
    versions: list[tuple[ModuleOutput, torch.Tensor, int]] = []
    pending: dict[int, list[tuple[tuple[int, ...] | None, bool]]] = {}  # id(module) -> stack of (in_shape, from_module)
    last_linear: list[str] = []
    handles = []

    def pre(m: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        shape = tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else None
        pending.setdefault(id(m), []).append((shape, isinstance(x, torch.Tensor) and id(x) in produced))

    def post(m: nn.Module, _args: tuple, out: object) -> None:
        path = names[m]
        in_shape, from_module = pending[id(m)].pop()
        counts[path] = counts.get(path, 0) + 1
        is_t = isinstance(out, torch.Tensor)
        rec = ModuleOutput(path, type(m).__name__, len(calls), in_shape, tuple(out.shape[1:]) if is_t else None,
                           from_module, _is_global_pool(m, out))
        if is_t:
            produced[id(out)] = out
            versions.append((rec, out, out._version))
        if isinstance(m, nn.Linear):
            last_linear.append(path)
        calls.append(rec)

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    was_training = model.training
    model.eval()
    try:
        out = model(torch.zeros(2, *input_shape, device=_device(model)))
    except (RuntimeError, ValueError, AssertionError) as e:  # the input does not fit the model (timm asserts sizes)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{type(model).__name__} cannot take inputs of shape {tuple(input_shape)} ({first}); choose a "
                        f"model for this image size and channel count, or resize the data") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for rec, t, v in versions:
        rec.mutated = t._version != v
    return Trace(tuple(input_shape), calls, tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else None,
                 counts, last_linear[-1] if last_linear else None)


def _halvings(big: int, small: int) -> int:
    """How many times a side was halved going from ``big`` to ``small`` (0: a valid conv's few pixels)."""
    if small <= 0 or small > math.ceil(big / 2):
        return 0
    return max(1, round(math.log2(big / small)))


def _levels(trace: Trace, calls: Sequence[ModuleOutput]) -> dict[Res, int]:
    """Downsampling level of every spatial size ``calls`` output: the input is level 0; a map at most half
    the size of the map before it is a level (or several) deeper; a few pixels less (an unpadded conv) is not."""
    h, w = trace.input_shape[1], trace.input_shape[2]
    levels: dict[Res, int] = {(h, w): 0}
    cur, level = (h, w), 0
    for call in calls:
        res = call.res
        if res is None or res == cur:
            continue
        if res in levels:  # a branch back at a known size (a shortcut, a concat)
            cur, level = res, levels[res]
            continue
        if res[0] < cur[0] or res[1] < cur[1]:
            level += max(_halvings(cur[0], res[0]), _halvings(cur[1], res[1]))
        levels[res] = level
        cur = res
    return levels


def _body(trace: Trace) -> list[ModuleOutput]:
    """The calls before the head's global pooling, without the insides of squeeze-and-excitation gates.

    A module that returns a map of its input's size while computing 1x1 maps inside is a gate (an SE
    block): its 1x1 calls are left out, and a global pool inside it is not the head's.
    """
    first = {c.path: c for c in reversed(trace.calls)}  # a module's first call

    def ancestors(path: str) -> list[ModuleOutput]:
        parts = path.split(".")
        return [first[a] for a in (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)) if a in first]

    def gated(c: ModuleOutput, size: Res | None) -> bool:  # inside a module that maps a map of `size` to one
        return size is not None and any(a.res == size and a.in_res == size for a in ancestors(c.path))

    stop = next((c.index for c in trace.calls if c.global_pool and not gated(c, c.in_res)), len(trace.calls))
    return [c for c in trace.calls[:stop]
            if not (c.res == (1, 1) and any(a.res is not None and a.res == a.in_res != (1, 1) for a in ancestors(c.path)))]


def _stage_calls(trace: Trace, candidates: Iterable[str] | None) -> list[ModuleOutput]:
    """The chosen call of each downsampling level, shallow to deep (see the module docstring)."""
    body = _body(trace)
    levels = _levels(trace, body)
    level_of = lambda r: levels.get(r) if r is not None else None  # noqa: E731
    # Per module: its input level and the levels of everything it and its descendants output.
    spans: dict[str, set[int]] = {}
    first: dict[str, ModuleOutput] = {}
    for call in body:
        first.setdefault(call.path, call)
        lv = level_of(call.res)
        if lv is None:
            continue
        parts = call.path.split(".") if call.path else []
        for i in range(1, len(parts) + 1):
            spans.setdefault(".".join(parts[:i]), set()).add(lv)

    def single_level(path: str) -> bool:
        c = first[path]
        return len(spans.get(path, set()) | ({level_of(c.in_res)} if level_of(c.in_res) is not None else set())) <= 2

    # Downsampling blocks: what they compute at their input's level before their stride is not a stage.
    blocks = [(c.path, level_of(c.in_res)) for c in first.values()
              if c.path and c.input_from_module and level_of(c.in_res) is not None and level_of(c.res) is not None
              and level_of(c.in_res) != level_of(c.res) and single_level(c.path)]

    def inside_block(call: ModuleOutput) -> bool:
        lv = level_of(call.res)
        return any(call.path.startswith(p + ".") and lv == lin for p, lin in blocks)

    allowed = set(candidates) if candidates is not None else None
    ok = [c for c in body
          if c.path and c.res is not None and len(c.out_shape or ()) == 3 and trace.counts.get(c.path) == 1
          and not c.mutated and (allowed is None or c.path in allowed) and single_level(c.path)
          and (allowed is not None or not inside_block(c))]
    chosen: dict[int, ModuleOutput] = {}
    for c in ok:  # completion order: the last one of a level wins (for one tensor, its outermost module)
        chosen[level_of(c.res)] = c  # type: ignore[index]
    return sorted(chosen.values(), key=lambda c: c.index)


def _timm_feature_modules(model: nn.Module) -> list[str] | None:
    info = getattr(model, "feature_info", None)
    if not info:
        return None
    try:
        mods = [str(f["module"]) for f in info] if isinstance(info, list) else list(info.module_name())
    except (TypeError, KeyError, AttributeError):
        return None
    named = dict(model.named_modules())
    mods = [m for m in mods if m in named]
    return mods or None


def discover_taps(model: nn.Module, input_shape: Sequence[int], *, trace: Trace | None = None) -> dict[str, str]:
    """Tap specs of ``model`` found by one dry forward: ``stage1``..``stageN``, ``embedding``, ``logits``.

    ``input_shape`` is one input's (C, H, W) at the data's real size: which maps are distinct stages
    depends on it (a 32x32 image reaches 1x1 where a 224x224 one is still 7x7).
    """
    trace = trace or trace_model(model, input_shape)
    if trace.output_shape is None or len(trace.output_shape) != 1:
        raise UserError(f"{type(model).__name__} does not return (N, classes) logits for inputs of shape "
                        f"{tuple(input_shape)} (got {trace.output_shape}); name its taps in the config")
    feature_modules = _timm_feature_modules(model)
    stages = _stage_calls(trace, feature_modules) if feature_modules else []
    if not stages:
        stages = _stage_calls(trace, None)
    taps = {f"stage{i}": c.path for i, c in enumerate(stages, 1)}
    if trace.last_linear is not None:
        taps["embedding"] = f"{trace.last_linear}:in"
    taps["logits"] = OUTPUT
    return taps


def _is_stage(name: str) -> bool:
    return name not in ("embedding", "logits")


def resolve_taps(model: nn.Module, explicit: Mapping[str, str] | str | None, input_shape: Sequence[int],
                 registered: Mapping[str, str] | None) -> dict[str, str]:
    """The taps a built model gets from its registered taps and a config's ``taps``.

    ``registered`` (a zoo model's) are updated name by name with ``explicit`` (the config adds or moves a
    tap). Without registered taps, or with ``taps: auto``, the taps are found (:func:`discover_taps`)
    at ``input_shape``; explicit stage taps then replace the found stages as a set (a mix of the two
    would pair half of one convention with half of the other) and explicit ``embedding`` / ``logits``
    replace the found ones.
    """
    if isinstance(explicit, str):
        if explicit != "auto":
            raise UserError(f"taps: {brief(explicit)} is neither 'auto' nor a mapping of tap name -> module path")
        explicit = None
        registered = None
    if registered is not None:
        taps = dict(registered)
        taps.update(explicit or {})
    else:
        taps = discover_taps(model, input_shape)
        if explicit and any(_is_stage(k) for k in explicit):
            taps = {k: v for k, v in taps.items() if not _is_stage(k)}
            taps = {**{k: v for k, v in explicit.items() if _is_stage(k)}, **taps}
        taps.update({k: v for k, v in (explicit or {}).items() if not _is_stage(k)})
    taps.setdefault("logits", OUTPUT)
    return taps
