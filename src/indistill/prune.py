"""Width alignment by pruning: per-tap channel selection and the pruned-teacher view.

Where a teacher tap is wider than the matching student tap, InDistill keeps
the student's number of teacher channels: those whose *producing* filters
have the largest L1 norm (structured L1 filter pruning, the ranking of
``torch.nn.utils.prune.ln_structured(n=1, dim=0)``). The pruned layer still
receives the teacher's unpruned previous activation, so the pruned tap is
exactly ``teacher_tap[:, kept]`` -- BatchNorm affine parameters, biases and
running statistics of the kept channels are those of the teacher. We never
build a smaller network to get the targets: :class:`PrunedTeacher` runs the
teacher once and index-selects the kept channels of its taps, which is the
same tensor the physically pruned layer would compute (the tests prove it
with :func:`physically_pruned_block`) and cannot lose BatchNorm statistics.

Producers
    The producer of a tap is found by one dry forward with hooks: for a tap on
    module ``M``'s output, the last ``Conv{1,2,3}d`` (4-D taps) executed inside
    ``M``'s subtree whose out-channels equal the tap's channels; failing
    that, the last such layer executed before the tap. For a ``"path:in"`` tap
    (the embedding) it is the last conv or linear executed before ``path``
    runs whose width matches (a conv for ``fc:in`` after global pooling, a
    linear for an MLP head). ``producers={tap: "module.path"}`` overrides it.

Importance
    ``"l1"`` (default, the authors' choice): L1 norm of the producer's
    filters. For a residual stage the producer is the last conv writing into
    the stage output (``layer1.2.conv2``), as in the paper.
    ``"group"``: Torch-Pruning's dependency graph gives the group of every
    layer coupled to the producer's output channels (through residual
    additions: all convs writing into the stage, their BatchNorms, and the
    convs/linears that read it); importance is
    ``tp.importance.MagnitudeImportance(p=1, group_reduction="mean",
    normalizer=None)`` over that group. "mean" and "sum" rank channels
    identically here (every member of the group covers all channels, so the
    mean is the sum divided by a constant); we use "mean" like Torch-Pruning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import IMPORTANCE_MODES, PRUNED_BN_MODES, RESIZE_MODES
from .errors import UserError, suggest
from .models.registry import model_record
from .models.taps import OUTPUT, Taps, parse_spec, resolve_module, tap_shapes
from .pairing import PASSTHROUGH, normalise_pairs

__all__ = [
    "IMPORTANCE_MODES",
    "PRUNED_BN_MODES",
    "find_norms",
    "RESIZE_MODES",
    "PrunedTeacher",
    "find_producers",
    "l1_filter_ranking",
    "physically_pruned_block",
    "prune_to_student",
    "resize_map",
]

# IMPORTANCE_MODES, RESIZE_MODES and PRUNED_BN_MODES (how a pruned tap's BatchNorm normalises, see
# :class:`PrunedTeacher`): config.py's vocabularies, re-exported here.
# PASSTHROUGH (from pairing, its one definition): taps passed through unpruned so that a KD stage gets them from
# the same teacher forward.

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def l1_filter_ranking(weight: torch.Tensor) -> torch.Tensor:
    """Output filters of a conv/linear ``weight`` ordered by L1 norm, largest first (ties: lower index first).

    The norm is the one ``torch.nn.utils.prune.ln_structured(n=1, dim=0)``
    uses, so ``l1_filter_ranking(w)[:k]`` is the set of filters it keeps.
    """
    if weight.dim() < 2:
        raise UserError(f"filter ranking needs a conv or linear weight (>= 2 dims), got shape {tuple(weight.shape)}")
    w = weight.detach()
    norms = torch.linalg.vector_norm(w, ord=1, dim=list(range(1, w.dim())))
    return torch.argsort(norms, descending=True, stable=True)


def physically_pruned_block(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, kept: torch.Tensor) -> nn.Sequential:
    """A new ``Conv2d`` (+ ``BatchNorm2d``) holding only the ``kept`` output channels of ``conv`` (+ ``bn``).

    Input channels are untouched (the layer reads the unpruned previous
    activation). BatchNorm's weight, bias, running mean/var, eps and momentum
    are carried over for the kept channels; its train/eval mode is copied.
    """
    if conv.groups != 1:
        raise UserError(f"physically_pruned_block supports groups=1 convs only, got groups={conv.groups}")
    kept = kept.to(conv.weight.device, torch.long)
    w = conv.weight.detach()
    new_conv = nn.Conv2d(
        conv.in_channels, len(kept), conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
        device=w.device, dtype=w.dtype,
    )
    with torch.no_grad():
        new_conv.weight.copy_(w[kept])
        if conv.bias is not None:
            new_conv.bias.copy_(conv.bias.detach()[kept])
    layers: list[nn.Module] = [new_conv]
    if bn is not None:
        new_bn = nn.BatchNorm2d(
            len(kept), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
            track_running_stats=bn.track_running_stats, device=w.device, dtype=w.dtype,
        )
        with torch.no_grad():
            if bn.affine:
                new_bn.weight.copy_(bn.weight.detach()[kept])
                new_bn.bias.copy_(bn.bias.detach()[kept])
            if bn.track_running_stats:
                new_bn.running_mean.copy_(bn.running_mean[kept])
                new_bn.running_var.copy_(bn.running_var[kept])
                new_bn.num_batches_tracked.copy_(bn.num_batches_tracked)
        new_bn.train(bn.training)
        layers.append(new_bn)
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- producers


def _is_producer(module: nn.Module, channels: int, vector_tap: bool) -> bool:
    if isinstance(module, _CONV):
        return module.out_channels == channels
    if vector_tap and isinstance(module, nn.Linear):
        return module.out_features == channels
    return False


@torch.no_grad()
def find_producers(
    model: nn.Module,
    specs: Mapping[str, str],
    input_shape: tuple[int, ...],
    overrides: Mapping[str, str] | None = None,
) -> dict[str, str | None]:
    """Module path of the layer producing each tap's channels (``None`` where none is found).

    Runs one dry forward (eval mode, zeros input) recording the execution
    order of every conv/linear and of every tap; see the module docstring for
    the rule. ``overrides`` maps tap name -> module path and wins.
    """
    overrides = dict(overrides or {})
    for tap in overrides:
        if tap not in specs:
            raise UserError(f"producers names unknown tap '{tap}'{suggest(tap, specs)}; taps: {', '.join(specs)}")
    events, shapes = _execution_order(model, specs, input_shape)
    modules = dict(model.named_modules())
    result: dict[str, str | None] = {}
    for tap, spec in specs.items():
        shape = shapes[tap]
        if tap in overrides:
            result[tap] = _checked_override(model, tap, overrides[tap], shape)
        else:
            result[tap] = _last_producer(events, modules, tap, spec, shape)
    return result


def _model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live (CPU for a model without any): where a dry forward's input goes."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _execution_order(
    model: nn.Module, specs: Mapping[str, str], input_shape: tuple[int, ...]
) -> tuple[list[tuple[str, str]], dict[str, tuple[int, ...]]]:
    """One dry forward (eval mode, zeros input): ``("layer", path)`` for every conv/linear and
    ``("tap", name)`` for every tap, in execution order, and each tap's shape (without the batch)."""
    name_of = {m: n for n, m in model.named_modules()}
    events: list[tuple[str, str]] = []
    handles = []

    def layer_hook(m, _i, _o):
        events.append(("layer", name_of[m]))

    def tap_hook(tap):
        return lambda *_a: events.append(("tap", tap))

    was_training = model.training
    try:
        for m in model.modules():
            if isinstance(m, (*_CONV, nn.Linear)):
                handles.append(m.register_forward_hook(layer_hook))
        for tap, spec in specs.items():
            path, kind = parse_spec(spec)
            if path == OUTPUT:
                continue
            mod = resolve_module(model, path)
            # Registered after the layer hooks, so a tap on a conv itself sees that conv first.
            handles.append(mod.register_forward_pre_hook(tap_hook(tap)) if kind == "in"
                           else mod.register_forward_hook(tap_hook(tap)))
        model.eval()
        with Taps(model, specs) as taps:
            _, feats = taps(torch.zeros(2, *input_shape, device=_model_device(model)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return events, {tap: tuple(f.shape[1:]) for tap, f in feats.items()}


def _checked_override(model: nn.Module, tap: str, path: str, shape: tuple[int, ...]) -> str:
    """``path``, the producer a user named for ``tap``, once it is a layer that can write that tap."""
    channels, vector_tap = shape[0], len(shape) == 1
    mod = resolve_module(model, path)
    if not _is_producer(mod, channels, vector_tap):
        raise UserError(
            f"producer '{path}' for tap {tap} {shape} is a {type(mod).__name__} without "
            f"{channels} output channels; name a conv{'/linear' if vector_tap else ''} writing that tap"
        )
    return path


def _last_producer(
    events: Sequence[tuple[str, str]], modules: Mapping[str, nn.Module], tap: str, spec: str, shape: tuple[int, ...]
) -> str | None:
    """The automatic producer of ``tap`` (module docstring): the last matching layer executed before the
    tap's (last) capture, preferring those inside the tapped module; ``"@output"`` sees the whole forward."""
    path, kind = parse_spec(spec)
    channels, vector_tap = shape[0], len(shape) == 1
    last = max((i for i, e in enumerate(events) if e == ("tap", tap)), default=len(events))
    before = [n for kind_, n in events[:last] if kind_ == "layer"]
    candidates = [n for n in before if _is_producer(modules[n], channels, vector_tap)]
    inside = [n for n in candidates if kind == "out" and path != OUTPUT and (n == path or n.startswith(path + "."))]
    return (inside or candidates or [None])[-1]


@torch.no_grad()
def find_norms(model: nn.Module, producers: Mapping[str, str], input_shape: tuple[int, ...], *,
               required: bool = True) -> dict[str, str]:
    """Module path of the BatchNorm that normalises each producer's output (``{tap: path}``).

    One dry forward (eval mode): the norm is the first ``BatchNorm{1,2,3}d`` that receives the
    producer's output tensor itself. A producer without one is a one-line error if ``required``,
    else left out of the result (pre-activation and norm-free networks have none).
    """
    name_of = {m: n for n, m in model.named_modules()}
    wanted = {path: tap for tap, path in producers.items()}
    outputs: dict[str, torch.Tensor] = {}
    found: dict[str, str] = {}
    handles = []

    def conv_hook(m, _i, out):
        if name_of[m] in wanted:
            outputs[name_of[m]] = out

    def bn_hook(m, inp, _o):
        for path, out in outputs.items():
            if inp and inp[0] is out and wanted[path] not in found:
                found[wanted[path]] = name_of[m]

    for m in model.modules():
        if name_of.get(m) in wanted:
            handles.append(m.register_forward_hook(conv_hook))
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            handles.append(m.register_forward_pre_hook(lambda m, i: bn_hook(m, i, None)))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(2, *input_shape, device=_model_device(model)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for tap, path in producers.items():
        if tap not in found and required:
            raise UserError(
                f"pruned_bn: authors needs a BatchNorm right after the producer '{path}' of teacher tap {tap}, "
                f"and none reads its output; use pruned_bn: teacher"
            )
    return found


def _authors_bn_hook(bn: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> torch.Tensor:
    # The authors' rebuilt BatchNorm: fresh, in training mode (batch statistics), kept gamma, beta = 0.
    return F.batch_norm(inputs[0], None, None, bn.weight, None, training=True, momentum=0.0, eps=bn.eps)


# --------------------------------------------------------------------------- importance


def _group_rankings(
    model: nn.Module, producers: Mapping[str, str], input_shape: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """Channel ranking per tap from Torch-Pruning's coupled groups (group L1 magnitude)."""
    import torch_pruning as tp

    device = _model_device(model)
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        # Tracing follows autograd, so frozen teachers are unfrozen for the trace (restored below).
        for p, _ in flags:
            p.requires_grad_(True)
        model.eval()  # Torch-Pruning traces in eval mode too: BatchNorm statistics stay untouched
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=torch.zeros(1, *input_shape, device=device), verbose=False
            )
        modules = dict(model.named_modules())
        scorer = tp.importance.MagnitudeImportance(p=1, group_reduction="mean", normalizer=None)
        out: dict[str, torch.Tensor] = {}
        for tap, path in producers.items():
            layer = modules[path]
            if isinstance(layer, nn.Linear):
                fn, n = tp.prune_linear_out_channels, layer.out_features
            else:
                fn, n = tp.prune_conv_out_channels, layer.out_channels
            group = dg.get_pruning_group(layer, fn, idxs=list(range(n)))
            imp = scorer(group)
            if imp is None or imp.numel() != n:
                raise UserError(f"torch-pruning found no usable group for '{path}' (tap {tap}); use importance='l1'")
            out[tap] = torch.argsort(imp.detach().cpu(), descending=True, stable=True)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return out


# --------------------------------------------------------------------------- pruned teacher


def resize_map(f: torch.Tensor, size: Sequence[int], mode: str | None) -> torch.Tensor:
    """A (pruned) teacher map ``f`` (N, C, H, W) brought to the student's spatial ``size``.

    Unchanged where the sizes already match or ``mode`` is None. ``"avgpool"``:
    ``F.adaptive_avg_pool2d`` (each output cell the mean of its window; an
    integer factor k is plain k x k average pooling, as the CRD benchmark
    aligns maps of different sizes). ``"bilinear"``: ``F.interpolate(mode=
    "bilinear", align_corners=False)`` (no antialiasing: shrinking by 2 equals
    2 x 2 average pooling, by more it samples), the option when the teacher
    map is smaller than the student's.
    """
    size = tuple(int(v) for v in size)
    if mode is None or tuple(f.shape[2:]) == size:
        return f
    if mode == "avgpool":
        return F.adaptive_avg_pool2d(f, size)
    if mode == "bilinear":
        return F.interpolate(f, size=size, mode="bilinear", align_corners=False)
    raise UserError(f"unknown resize '{mode}'; choose 'avgpool', 'bilinear' or leave it unset (null)")


def _buffer_name(tap: str) -> str:
    return "kept_" + "".join(c if c.isalnum() or c == "_" else "_" for c in tap)


class PrunedTeacher(nn.Module):
    """A frozen teacher whose taps are restricted to the channels kept for each student tap.

    ``forward(x)`` runs the teacher once (eval mode, no grad) and returns a
    dict keyed by *student* tap name: ``teacher_tap[:, kept]`` (resized to the
    student's spatial size by :func:`resize_map` where ``resize`` is set), plus the
    teacher's unpruned ``"embedding"`` and ``"logits"`` when the teacher has
    those taps and no pair already produces that name.

    ``bn="teacher"`` (default): a pruned tap is exactly the teacher's eval-mode
    activation restricted to the kept channels. ``bn="authors"``: as the
    authors' code builds its pruned network, the BatchNorm after each pruned
    producer (``norms``) is a fresh one that keeps gamma, sets beta = 0 and
    normalises with the *batch's* statistics in every mode, so the target is
    e.g. ``pool(relu(gamma * (z - mean_B(z)) / sqrt(var_B(z) + eps)))`` of the
    kept channels ``z`` of the producer's output. It is computed one tap at a
    time (:meth:`target`), each forward altering only that tap's BatchNorm, so
    deeper layers read the teacher's own activations, as in the authors' code.
    A pruned tap whose producer no BatchNorm reads (pre-activation or norm-free
    networks: there is nothing to rebuild) keeps the teacher's activation; the
    table's ``bn`` column and :attr:`teacher_bn_taps` name those taps.

    Attributes: ``teacher``, ``pairs`` (teacher tap -> student tap),
    ``kept`` (teacher tap -> sorted LongTensor), ``widths`` (teacher tap ->
    (teacher channels, student channels)), ``producers`` (teacher tap ->
    module path or None), ``shapes`` (teacher tap -> (teacher shape, student
    shape)), ``importance``, ``resize``, ``bn``, ``norms`` (pruned teacher tap ->
    BatchNorm path, ``bn="authors"`` only), ``pruned_taps`` (the taps narrowed).
    """

    def __init__(
        self,
        teacher: nn.Module,
        teacher_taps: Mapping[str, str],
        pairs: Mapping[str, str],
        kept: Mapping[str, torch.Tensor],
        shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]],
        producers: Mapping[str, str | None],
        importance: str = "l1",
        resize: str | None = None,
        bn: str = "teacher",
        norms: Mapping[str, str] | None = None,
    ):
        super().__init__()
        if bn not in PRUNED_BN_MODES:
            raise UserError(f"pruned_bn '{bn}' is not one of {', '.join(PRUNED_BN_MODES)}")
        self.teacher = teacher
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        self.pairs = dict(pairs)
        self.shapes = {t: (tuple(a), tuple(b)) for t, (a, b) in shapes.items()}
        self.widths = {t: (a[0], b[0]) for t, (a, b) in self.shapes.items()}
        self.producers = dict(producers)
        self.importance = importance
        self.resize = resize
        self.pruned_taps = frozenset(t for t in self.pairs if self.widths[t][0] != self.widths[t][1])
        self.bn = bn
        self.norms = dict(norms or {}) if bn == "authors" else {}
        for t in self.pairs:
            self.register_buffer(_buffer_name(t), torch.as_tensor(kept[t], dtype=torch.long).sort().values.clone())
        extra = {n: teacher_taps[n] for n in PASSTHROUGH if n in teacher_taps and n not in self.pairs.values()}
        self.tap_specs = {t: teacher_taps[t] for t in self.pairs} | extra

    @property
    def kept(self) -> dict[str, torch.Tensor]:
        """Kept teacher channels per teacher tap (sorted ascending)."""
        return {t: getattr(self, _buffer_name(t)) for t in self.pairs}

    def train(self, mode: bool = True) -> "PrunedTeacher":
        # The teacher is a fixed target: BatchNorm must keep using its running statistics.
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pruned targets (by student tap name) plus unpruned embedding/logits, from one teacher forward
        (``bn="authors"``: one forward per pruned tap, see the class docstring)."""
        self.teacher.eval()
        if self.bn == "authors" and self.pruned_taps:
            keys = list(self.pairs.values()) + [n for n in PASSTHROUGH if n in self.tap_specs]
            return {k: self.target(x, k) for k in keys}
        with Taps(self.teacher, self.tap_specs) as taps:
            _, feats = taps(x)
        return self.targets_from(feats)

    @torch.no_grad()
    def target(self, x: torch.Tensor, key: str) -> torch.Tensor:
        """``self(x)[key]``, running the frozen teacher only as far as that one tap.

        ``key`` is a student tap name (or an unpaired ``embedding``/``logits``). A curriculum phase reads
        one target, so the forward stops where that tap is captured; the tensor is the one
        :meth:`forward` returns for ``key``, bit for bit (``tests/test_perf_equivalence.py``).
        """
        self.teacher.eval()
        t = next((t for t, s in self.pairs.items() if s == key), None)
        if t is None:  # an unpaired embedding/logits tap passes through unpruned
            if key not in self.tap_specs:
                raise UserError(f"the pruned teacher has no '{key}' tap; name it in the teacher's taps")
            with Taps(self.teacher, {key: self.tap_specs[key]}) as taps:
                return taps.capture(x)[key]
        hook = None
        if t in self.norms:
            hook = resolve_module(self.teacher, self.norms[t]).register_forward_hook(_authors_bn_hook)
        try:
            with Taps(self.teacher, {t: self.tap_specs[t]}) as taps:
                f = taps.capture(x)[t]
        finally:
            if hook is not None:
                hook.remove()
        return self._select(t, f)

    def _select(self, t: str, f: torch.Tensor) -> torch.Tensor:
        if t in self.pruned_taps:
            f = f.index_select(1, self.kept[t].to(f.device))
        return resize_map(f, self.shapes[t][1][1:], self.resize)

    def targets_from(self, teacher_feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Apply the channel selection (and resize) to teacher taps already computed, keyed by teacher tap name.

        Not for ``bn="authors"``, whose targets need their own forward (:meth:`target`).
        """
        if self.norms:
            raise UserError("pruned_bn: authors targets cannot be cut from the teacher's own taps; "
                            "use PrunedTeacher.target(x, tap) or call the pruned teacher")
        missing = [t for t in self.pairs if t not in teacher_feats]
        if missing:
            raise UserError(
                f"teacher features lack tap(s) {', '.join(missing)} (have: {', '.join(teacher_feats)}); "
                f"capture them with Taps(teacher, pruned.tap_specs)"
            )
        out: dict[str, torch.Tensor] = {}
        for t, s in self.pairs.items():
            out[s] = self._select(t, teacher_feats[t])
        for n in PASSTHROUGH:
            if n in teacher_feats and n not in out:
                out[n] = teacher_feats[n]
        return out

    def table(self) -> list[dict[str, Any]]:
        """One row per pair: teacher/student tap and shape, kept count, producer module."""
        return [
            {
                "teacher_tap": t,
                "student_tap": s,
                "teacher_shape": self.shapes[t][0],
                "student_shape": self.shapes[t][1],
                "kept": len(self.kept[t]),
                "producer": self.producers.get(t),
                "bn": self._bn_of(t),
            }
            for t, s in self.pairs.items()
        ]

    def _bn_of(self, t: str) -> str:
        if t in self.norms:
            return f"authors ({self.norms[t]})"
        if self.bn == "authors" and t in self.pruned_taps:
            return f"teacher (no BatchNorm reads the output of {self.producers.get(t)})"
        return "teacher"

    @property
    def teacher_bn_taps(self) -> list[str]:
        """Pruned taps that keep the teacher's own activation under ``bn="authors"``: no BatchNorm reads
        their producer's output (pre-activation or norm-free networks), so there is none to rebuild."""
        return [t for t in self.pairs if self.bn == "authors" and t in self.pruned_taps and t not in self.norms]

    def extra_repr(self) -> str:
        return ", ".join(f"{r['teacher_tap']}->{r['student_tap']}: {r['teacher_shape'][0]}->{r['kept']}" for r in self.table())


def _specs_of(model: nn.Module, explicit: Mapping[str, str] | None, role: str) -> dict[str, str]:
    if explicit is not None:
        return dict(explicit)
    rec = model_record(model)
    specs = rec.taps if rec is not None else None
    if specs is None:
        raise UserError(
            f"{role} {type(model).__name__} declares no taps; pass {role}_taps="
            f"{{'stage1': 'layer1', 'embedding': 'fc:in', 'logits': '@output'}}"
        )
    return dict(specs)


def prune_to_student(
    teacher: nn.Module,
    student: nn.Module,
    pairs: Mapping[str, str] | Sequence[str] | None = None,
    *,
    input_shape: tuple[int, ...],
    importance: str = "l1",
    producers: Mapping[str, str] | None = None,
    resize: str | None = None,
    teacher_taps: Mapping[str, str] | None = None,
    student_taps: Mapping[str, str] | None = None,
    bn: str = "teacher",
) -> PrunedTeacher:
    """Choose, for each teacher tap in ``pairs``, the teacher channels matching the student tap's width.

    Args:
        teacher, student: models; their taps come from their records (:func:`~indistill.models.model_taps`) or
            the explicit ``teacher_taps`` / ``student_taps`` spec dicts.
        pairs: teacher tap name -> student tap name; a list means equal names;
            ``None`` pairs every stage tap the two share (not embedding/logits).
        input_shape: one input's (C, H, W), for the dry forward that finds shapes.
        importance: ``"l1"`` (producer filter L1 norm) or ``"group"``
            (Torch-Pruning coupled-group L1 magnitude).
        producers: teacher tap -> module path, overriding the automatic producer.
        resize: ``None`` (spatial sizes must match), ``"avgpool"`` (adaptive
            average pooling of the teacher map down to the student size; it
            cannot enlarge) or ``"bilinear"`` (bilinear interpolation,
            ``align_corners=False``, to the student size, either way). Only
            pairs whose sizes differ are resized; see :func:`resize_map`.
        bn: ``"teacher"`` (the teacher's own BatchNorm, exact restriction) or
            ``"authors"`` (the authors' rebuilt BatchNorm; see :class:`PrunedTeacher`).

    Returns:
        A :class:`PrunedTeacher`; the teacher itself is frozen in place
        (``requires_grad=False``) and kept in eval mode from then on.

    Raises:
        UserError: unknown taps, a teacher tap narrower than its student tap,
            different spatial sizes without ``resize``, no producer found.
    """
    _check_modes(importance, resize, bn)
    t_specs = _specs_of(teacher, teacher_taps, "teacher")
    s_specs = _specs_of(student, student_taps, "student")
    pairs = normalise_pairs(pairs, t_specs, s_specs)
    input_shape = tuple(input_shape)
    shapes = _pair_shapes(teacher, student, pairs, t_specs, s_specs, input_shape, resize)
    to_prune = [t for t in pairs if shapes[t][0][0] != shapes[t][1][0]]
    found = find_producers(teacher, {t: t_specs[t] for t in pairs}, input_shape, overrides=producers)
    producer_of = {t: _required(found[t], t, t_specs[t], shapes[t][0][0]) for t in to_prune}
    rankings = _rankings(teacher, producer_of, importance, input_shape)
    # the student's width of teacher channels: the best ranked (sorted), or all of an unpruned tap
    kept = {t: rankings[t][: shapes[t][1][0]].sort().values if t in rankings else torch.arange(shapes[t][1][0])
            for t in pairs}
    norms = find_norms(teacher, producer_of, input_shape, required=False) if bn == "authors" else None
    return PrunedTeacher(teacher, t_specs, pairs, kept, shapes, found, importance=importance, resize=resize,
                         bn=bn, norms=norms)


def _required(producer: str | None, tap: str, spec: str, channels: int) -> str:
    """The producer of a tap that is pruned: one must have been found or named."""
    if producer is None:
        raise UserError(
            f"no conv/linear with {channels} output channels produces teacher tap {tap} ({spec}); "
            f"name it with producers: {{{tap}: <module path>}}"
        )
    return producer


def _rankings(teacher: nn.Module, producer_of: Mapping[str, str], importance: str, input_shape: tuple[int, ...]
              ) -> dict[str, torch.Tensor]:
    """Each pruned tap's teacher channels, most important first (module docstring, "Importance")."""
    if importance == "group" and producer_of:
        return _group_rankings(teacher, producer_of, input_shape)
    modules = dict(teacher.named_modules())
    return {t: l1_filter_ranking(modules[path].weight).cpu() for t, path in producer_of.items()}


def _check_modes(importance: str, resize: str | None, bn: str) -> None:
    if importance not in IMPORTANCE_MODES:
        raise UserError(f"unknown importance '{importance}'; choose one of: {', '.join(IMPORTANCE_MODES)}")
    if resize not in RESIZE_MODES:
        raise UserError(f"unknown resize '{resize}'; choose 'avgpool', 'bilinear' or leave it unset (null)")
    if bn not in PRUNED_BN_MODES:
        raise UserError(f"pruned_bn '{bn}' is not one of {', '.join(PRUNED_BN_MODES)}")


def _pair_shapes(
    teacher: nn.Module, student: nn.Module, pairs: Mapping[str, str], t_specs: Mapping[str, str],
    s_specs: Mapping[str, str], input_shape: tuple[int, ...], resize: str | None,
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """``{teacher tap: (teacher shape, student shape)}`` from one dry forward of each model, once every
    pair passes :func:`_check_pair`."""
    t_shapes = tap_shapes(teacher, {t: t_specs[t] for t in pairs}, input_shape)
    s_shapes = tap_shapes(student, {s: s_specs[s] for s in pairs.values()}, input_shape)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for t, s in pairs.items():
        _check_pair(t, s, t_shapes[t], s_shapes[s], resize)
        shapes[t] = (t_shapes[t], s_shapes[s])
    return shapes


def _check_pair(t: str, s: str, ts: tuple[int, ...], ss: tuple[int, ...], resize: str | None) -> None:
    """The checks every pair must pass, each with its own one-line error: same rank, a teacher at least as
    wide, and equal spatial sizes unless ``resize`` can bring the teacher map to the student's."""
    what = f"teacher tap {t} {ts} and student tap {s} {ss}"
    if len(ts) != len(ss):
        raise UserError(f"{what} have different ranks; pair a feature map with a feature map, a vector with a vector")
    if ts[0] < ss[0]:
        raise UserError(
            f"teacher tap {t} {ts} is narrower than student tap {s} {ss}: "
            f"choose a wider teacher or a narrower student"
        )
    if ts[1:] == ss[1:]:
        return
    if resize is None:
        raise UserError(
            f"{what} differ in spatial size: choose taps with equal sizes, or opt in to "
            f"resize: avgpool (shrinks the teacher map) or resize: bilinear (either way)"
        )
    if len(ts) != 3:
        raise UserError(f"{what}: resize works on (C, H, W) feature maps only; choose taps with equal sizes")
    if resize == "avgpool" and any(a < b for a, b in zip(ts[1:], ss[1:])):
        raise UserError(
            f"{what}: resize avgpool only shrinks, but the teacher map is smaller; "
            f"choose other taps or resize: bilinear"
        )
