"""Which teacher tap pairs with which student tap (stage taps, shallow to deep).

:func:`pair_taps` is the one place pairs are made: ``warmup.pairs`` when the config gives them,
else automatically, teacher and student stage taps paired shallow to deep by equal H x W (evenly
spaced where one side has more stages at a size), or by depth when ``warmup.resize`` allows
different sizes. The result, a :class:`TapPairs`, is validated once per arm and handed to both the
warmup (which prunes the teacher to it) and the KD method (which reads its stage taps); it prints
as a table and as the YAML block that pins it (``indistill pair``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import UserError, suggest
from .models import model_taps, tap_shapes

PASSTHROUGH = ("embedding", "logits")


def stage_taps(model: nn.Module) -> list[str]:
    """The intermediate tap names of a model, shallow to deep."""
    return [k for k in model_taps(model) if k not in PASSTHROUGH]


def pair_stage_taps(teacher: nn.Module, student: nn.Module, explicit: dict[str, str] | None) -> dict[str, str]:
    """Teacher tap -> student tap: ``explicit`` (``warmup.pairs``) or the stage taps both models share by name."""
    t_taps, s_taps = model_taps(teacher), model_taps(student)
    if explicit:
        for t, s in explicit.items():
            if t not in t_taps:
                raise UserError(f"warmup.pairs: teacher has no tap '{t}'{suggest(t, t_taps)}; its taps: {', '.join(t_taps)}")
            if s not in s_taps:
                raise UserError(f"warmup.pairs: student has no tap '{s}'{suggest(s, s_taps)}; its taps: {', '.join(s_taps)}")
        return dict(explicit)
    shared = [t for t in stage_taps(teacher) if t in stage_taps(student)]
    if not shared:
        raise UserError(
            "teacher and student share no stage tap names; give warmup.pairs "
            f"(teacher taps: {', '.join(stage_taps(teacher)) or 'none'}; "
            f"student taps: {', '.join(stage_taps(student)) or 'none'})"
        )
    return {t: t for t in shared}


def stage_order(model: nn.Module, input_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """The stage taps of ``model`` with their shapes (C, H, W), in the order the forward reaches them."""
    specs = model_taps(model)
    names = [k for k in specs if k not in PASSTHROUGH]
    if not names:
        return {}
    return tap_shapes(model, {k: specs[k] for k in names}, tuple(input_shape))  # capture order: shallow to deep


@dataclass(frozen=True)
class TapSide:
    """One tap of one model: its name, spec (module path) and shape (C, H, W) at the data's input size."""

    name: str
    spec: str
    shape: tuple[int, ...]

    def show(self) -> str:
        return " x ".join(str(v) for v in self.shape)


@dataclass(frozen=True)
class TapPair:
    """A teacher stage tap distilled into a student stage tap."""

    teacher: TapSide
    student: TapSide

    @property
    def pruned(self) -> int:
        """Teacher channels the warmup prunes away for this pair (negative: the teacher is narrower)."""
        return self.teacher.shape[0] - self.student.shape[0]

    @property
    def resized(self) -> bool:
        return self.teacher.shape[1:] != self.student.shape[1:]


def _spread(n: int, k: int) -> list[int]:
    """``k`` of ``range(n)`` evenly spaced, ending at the deepest (``n - 1``); halves round up."""
    return [math.floor((i + 1) * n / k + 0.5) - 1 for i in range(k)] if k else []


class TapPairs(Mapping[str, str]):
    """The stage pairs of one teacher (or auxiliary) and one student: teacher tap -> student tap.

    A read-only mapping (so anything taking ``{teacher_tap: student_tap}`` takes it), ordered shallow to
    deep, that also knows every tap's module path and shape, how it was made (``how``), the stage taps
    left unpaired, and how to print itself (:meth:`table`, :meth:`yaml`, :meth:`record`).
    """

    def __init__(self, pairs: Sequence[TapPair], how: str, teacher_stages: Sequence[TapSide],
                 student_stages: Sequence[TapSide], resize: str | None = None):
        self.pairs = tuple(pairs)
        self.how = how
        self.teacher_stages = tuple(teacher_stages)
        self.student_stages = tuple(student_stages)
        self.resize = resize
        self._map = {p.teacher.name: p.student.name for p in self.pairs}

    # -- Mapping ------------------------------------------------------------------------------------
    def __getitem__(self, teacher_tap: str) -> str:
        return self._map[teacher_tap]

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def __repr__(self) -> str:
        return f"TapPairs({self._map!r}, how={self.how!r})"

    @property
    def student_taps(self) -> list[str]:
        """The paired student stage taps, shallow to deep."""
        return [p.student.name for p in self.pairs]

    def restricted(self, student_taps: Sequence[str] | None) -> TapPairs:
        """Only the pairs of ``student_taps`` (``warmup.taps``); all of them for None."""
        if student_taps is None:
            return self
        missing = [t for t in student_taps if t not in self.student_taps]
        if missing:
            raise UserError(f"warmup.taps {missing} have no teacher tap paired ({self.describe()}); pair them in "
                            f"warmup.pairs or drop them")
        keep = set(student_taps)
        return TapPairs([p for p in self.pairs if p.student.name in keep], self.how, self.teacher_stages,
                        self.student_stages, self.resize)

    def check_prunable(self, role: str = "teacher") -> None:
        """What pruning needs of every pair: a teacher at least as wide, equal sizes unless ``resize`` allows."""
        for p in self.pairs:
            t, s = p.teacher, p.student
            what = f"{role} tap {t.name} {t.shape} ({t.spec}) and student tap {s.name} {s.shape} ({s.spec})"
            if len(t.shape) != len(s.shape):
                raise UserError(f"{what}: a feature map is paired with a vector; pair maps with maps in warmup.pairs")
            if p.pruned < 0:
                usable = [q.student.name for q in self.pairs if q.pruned >= 0]
                fix = f"warmup.taps={usable} to distil the others" if usable else "a wider teacher"
                raise UserError(f"{what}: the {role} tap is narrower, so pruning cannot align them; use "
                                f"{fix}, or warmup.pairs to pair another {role} tap")
            if p.resized and self.resize is None:
                raise UserError(f"{what} differ in spatial size: choose taps with equal sizes (warmup.pairs), or opt in "
                                f"to resize: avgpool (shrinks the {role} map) or resize: bilinear (either way)")

    # -- printing -----------------------------------------------------------------------------------
    def describe(self) -> str:
        return ", ".join(f"{p.teacher.name}->{p.student.name}" for p in self.pairs) or "no pairs"

    def table(self) -> list[dict[str, Any]]:
        """One row per pair: tap names, module paths, C x H x W on both sides, channels pruned."""
        return [{"teacher_tap": p.teacher.name, "teacher_module": p.teacher.spec, "teacher_shape": list(p.teacher.shape),
                 "student_tap": p.student.name, "student_module": p.student.spec, "student_shape": list(p.student.shape),
                 "pruned": p.pruned, "resized": p.resized} for p in self.pairs]

    def markdown(self, role: str = "teacher") -> str:
        """The pairing as a markdown table (unpaired stage taps listed below it)."""
        return pairs_markdown(self.record(), role)

    def yaml(self, teacher_key: str = "teacher") -> str:
        """The YAML block that pins this pairing: both models' stage taps by module path, and the pairs."""
        t_taps = {p.teacher.name: p.teacher.spec for p in self.pairs}
        s_taps = {p.student.name: p.student.spec for p in self.pairs}

        def flow(d: Mapping[str, str]) -> str:
            return "{" + ", ".join(f"{k}: {_quote(v)}" for k, v in d.items()) + "}"

        lines = [f"{teacher_key}:", f"  taps: {flow(t_taps)}", "student:", f"  taps: {flow(s_taps)}", "warmup:",
                 f"  pairs: {flow(dict(self._map))}"]
        if self.resize:
            lines.append(f"  resize: {self.resize}")
        return "\n".join(lines)

    def record(self) -> dict[str, Any]:
        """What the run's log and ``results.json`` keep: how the pairs were made, the table, the taps left out."""
        def side(x: TapSide) -> dict[str, Any]:
            return {"tap": x.name, "module": x.spec, "shape": list(x.shape)}

        return {"how": self.how, "resize": self.resize, "pairs": self.table(),
                "unpaired_teacher": [side(x) for x in self.teacher_stages if x.name not in self._map],
                "unpaired_student": [side(x) for x in self.student_stages if x.name not in self._map.values()]}


def _shape(v: Sequence[int]) -> str:
    return " x ".join(str(int(x)) for x in v)


def pairs_markdown(record: Mapping[str, Any], role: str = "teacher") -> str:
    """A :meth:`TapPairs.record` (as ``results.json`` keeps it) as a markdown table, unpaired taps below."""
    lines = [f"| {role} tap | module | C x H x W | student tap | module | C x H x W | channels pruned |",
             "|---|---|---|---|---|---|---|"]
    for r in record.get("pairs", []):
        ct, cs = r["teacher_shape"][0], r["student_shape"][0]
        pruned = f"{ct} -> {cs} ({ct - cs} pruned)" if ct != cs else "none"
        if r.get("resized"):
            pruned += f"; resized ({record.get('resize')})"
        lines.append(f"| {r['teacher_tap']} | `{r['teacher_module']}` | {_shape(r['teacher_shape'])} | "
                     f"{r['student_tap']} | `{r['student_module']}` | {_shape(r['student_shape'])} | {pruned} |")
    left = [f"{role} {x['tap']} (`{x['module']}`, {_shape(x['shape'])})" for x in record.get("unpaired_teacher", [])]
    left += [f"student {x['tap']} (`{x['module']}`, {_shape(x['shape'])})" for x in record.get("unpaired_student", [])]
    return "\n".join(lines) + f"\n\nPaired by {record.get('how')}." + (f" Not paired: {', '.join(left)}." if left else "")


def _quote(v: str) -> str:
    # YAML reads "fc:in", "@output" and paths like "0" as something else unless quoted.
    return f"'{v}'" if not v.replace(".", "").replace("_", "").isalnum() or v.replace(".", "").isdigit() else v


def normalise_pairs(pairs: Mapping[str, str] | Sequence[str] | None, t_specs: Mapping[str, str],
                    s_specs: Mapping[str, str], where: str = "pairs") -> dict[str, str]:
    """Check explicit pairs (teacher tap -> student tap; a list means equal names) against both models' taps.

    ``None`` pairs the stage taps the two share by name (the Python API's default, ``prune_to_student``).
    """
    if pairs is None:
        pairs = [n for n in t_specs if n in s_specs and n not in PASSTHROUGH]
        if not pairs:
            raise UserError(f"teacher and student share no stage tap names; pass {where}={{teacher_tap: student_tap}}")
    if not isinstance(pairs, Mapping):
        pairs = {n: n for n in pairs}
    for t, s in pairs.items():
        if t not in t_specs:
            raise UserError(f"{where}: teacher has no tap '{t}'{suggest(t, t_specs)}; teacher taps: {', '.join(t_specs)}")
        if s not in s_specs:
            raise UserError(f"{where}: student has no tap '{s}'{suggest(s, s_specs)}; student taps: {', '.join(s_specs)}")
    if len(set(pairs.values())) != len(pairs):
        raise UserError(f"two teacher taps map to the same student tap in {where} {dict(pairs)}; pair each student tap once")
    return dict(pairs)


def _auto_pairs(t: list[TapSide], s: list[TapSide], resize: str | None) -> list[tuple[TapSide, TapSide]]:
    """Stage taps paired shallow to deep: by equal H x W, or (``resize`` set) by depth; evenly spaced where
    one side has more taps than the other."""
    if resize is not None:
        k = min(len(t), len(s))
        return list(zip([t[i] for i in _spread(len(t), k)], [s[i] for i in _spread(len(s), k)]))
    out = []
    for size in dict.fromkeys(x.shape[1:] for x in s):  # student sizes, shallow to deep
        ts = [x for x in t if x.shape[1:] == size]
        ss = [x for x in s if x.shape[1:] == size]
        k = min(len(ts), len(ss))
        out += zip([ts[i] for i in _spread(len(ts), k)], [ss[i] for i in _spread(len(ss), k)])
    return out


def pair_taps(teacher: nn.Module, student: nn.Module, input_shape: Sequence[int], *,
              pairs: Mapping[str, str] | None = None, resize: str | None = None, role: str = "teacher") -> TapPairs:
    """The stage pairs of ``teacher`` and ``student`` for inputs of ``input_shape`` (C, H, W).

    ``pairs`` (``warmup.pairs``) wins; without it the pairs are found automatically (see the module
    docstring). No pair at all is a one-line error that says what each side has.
    """
    t_specs, s_specs = model_taps(teacher), model_taps(student)
    t_shapes, s_shapes = stage_order(teacher, input_shape), stage_order(student, input_shape)
    t_stages = [TapSide(k, t_specs[k], v) for k, v in t_shapes.items()]
    s_stages = [TapSide(k, s_specs[k], v) for k, v in s_shapes.items()]
    if pairs:
        explicit = normalise_pairs(pairs, t_specs, s_specs, where="warmup.pairs")
        by_t, by_s = {x.name: x for x in t_stages}, {x.name: x for x in s_stages}
        # a pair may name a tap that is not a stage (a flat one): measure it too, after the stages
        for model, specs, names, by in ((teacher, t_specs, list(explicit), by_t),
                                        (student, s_specs, list(explicit.values()), by_s)):
            other = [n for n in names if n not in by]
            if other:
                for k, v in tap_shapes(model, {n: specs[n] for n in other}, tuple(input_shape)).items():
                    by[k] = TapSide(k, specs[k], v)
        order = {x: i for i, x in enumerate(by_s)}
        made = sorted(((by_t[a], by_s[b]) for a, b in explicit.items()), key=lambda ab: order[ab[1].name])
        how = "warmup.pairs"
    else:
        made = _auto_pairs(t_stages, s_stages, resize)
        how = "depth, evenly spaced (warmup.resize)" if resize is not None else "equal H x W, shallow to deep"
        if not made:
            def sizes(xs: list[TapSide]) -> str:
                return ", ".join(f"{x.name} {x.show()}" for x in xs) or "none"

            raise UserError(f"no {role} and student stage taps of equal H x W to pair ({role}: {sizes(t_stages)}; "
                            f"student: {sizes(s_stages)}); set warmup.resize: avgpool to pair them by depth, or give "
                            f"warmup.pairs")
    return TapPairs([TapPair(a, b) for a, b in made], how, t_stages, s_stages, resize)
