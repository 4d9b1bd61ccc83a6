"""The constraints live on the fields: every vocabulary, registry name and range is declared beside its
field (``Literal[...]`` / ``opt(registry=..., ge=..., help=...)``), and these tests fail when one is missing
or not enforced. Also: one spelling of PKT's variant (older spellings read through ``upgrade_legacy``), and
the top-level ``model`` / ``train`` left out of a written config at their defaults without breaking resume."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import pytest
import yaml

from indistill import config as C
from indistill.config import Config, config_from_tree, dump_config, load_config, to_dict
from indistill.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def _fields() -> list[tuple[str, dataclasses.Field, typing.Any, bool]]:
    """(override path, field, type, in an arm) for every leaf field of Config and of an arm."""
    out = []

    def walk(cls: type, prefix: str, arm: bool) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.", arm)
            elif f.name != "arms":
                out.append((f"{prefix}{f.name}", f, tp, arm))

    walk(Config, "", False)
    walk(C.ArmSpec, "", True)
    return out


FIELDS = _fields()


def _override(path: str, arm: bool, value: str) -> str:
    return f"arms=[{{name: a, {path}: {value}}}]" if arm else f"{path}={value}"


def _list_item(tp: typing.Any) -> typing.Any | None:
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    bare = [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]
    return typing.get_args(bare[0])[0] if len(bare) == 1 and typing.get_origin(bare[0]) is list else None


def _one_line_error(override: str) -> str:
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_the_walk_finds_every_kind_of_field():
    paths = {p for p, *_ in FIELDS}
    assert {"precision", "student.train.optimizer.lr", "warmup.resize", "evaluate.metrics", "reference"} <= paths


@pytest.mark.parametrize("path, f, tp, arm", FIELDS, ids=[p + ("@arm" if a else "") for p, _, _, a in FIELDS])
def test_every_field_has_help(path, f, tp, arm):
    assert f.metadata.get("help", "").strip(), f"{path}: give it help=... (docs/config.md shows it)"


CHOICE_FIELDS = [(p, f, tp, a) for p, f, tp, a in FIELDS
                 if C.choices_of(tp) is not None or (_list_item(tp) is not None and C.choices_of(_list_item(tp)))]


def test_the_fixed_vocabularies_are_literal_fields():
    found = {p for p, *_ in CHOICE_FIELDS}
    assert {"precision", "student.optimizer_reset", "warmup.mode", "warmup.reference", "warmup.pruned_bn",
            "warmup.importance", "warmup.resize", "warmup.pkt_variant", "auxiliary.pkt_variant",
            "evaluate.metrics", "evaluate.protocols", "train.precision", "warmup", "reference", "optimizer_reset",
            "pruned_bn"} <= found, found


@pytest.mark.parametrize("path, f, tp, arm", CHOICE_FIELDS, ids=[p + ("@arm" if a else "") for p, *_, a in CHOICE_FIELDS])
def test_every_choice_field_rejects_a_typo_with_did_you_mean(path, f, tp, arm):
    item = _list_item(tp)
    choices = [c for c in (C.choices_of(tp) or C.choices_of(item)) if c is not None]
    typo = choices[-1] + "x"
    msg = _one_line_error(_override(path, arm, f"[{typo}]" if item is not None else typo))
    assert path in msg and f"'{typo}' is not one of" in msg and "did you mean" in msg and choices[-1] in msg, msg
    for c in choices:  # and accepts every word of its vocabulary
        load_config(None, [_override(path, arm, f"[{c}]" if item is not None else c)])


REGISTRY_FIELDS = [(p, f, tp, a) for p, f, tp, a in FIELDS if "registry" in f.metadata]


def test_the_pluggable_names_are_registry_fields():
    assert {"kd.method", "method", "data.name", "train.optimizer.name", "train.scheduler.name", "warmup.tap_loss",
            "warmup.embedding_loss", "warmup.schedule", "evaluate.extra_metrics"} <= {p for p, *_ in REGISTRY_FIELDS}


@pytest.mark.parametrize("path, f, tp, arm", REGISTRY_FIELDS, ids=[p + ("@arm" if a else "") for p, *_, a in REGISTRY_FIELDS])
def test_every_registry_field_rejects_a_typo_with_did_you_mean(path, f, tp, arm):
    registry = C.registry_of(f.metadata["registry"])
    name = f.default if isinstance(f.default, str) else registry.names()[0]
    item = _list_item(tp)
    msg = _one_line_error(_override(path, arm, f"[{name}x]" if item is not None else f"{name}x"))
    assert path in msg and f"{name}x" in msg and "did you mean" in msg and name in msg, msg


RANGED_FIELDS = [(p, f, tp, a) for p, f, tp, a in FIELDS if "range" in f.metadata]


def _outside(rng: C._Range) -> list[float]:
    out = []
    if rng.lo is not None:
        out.append(rng.lo - 1 if rng.lo_incl else rng.lo)
    if rng.hi is not None:
        out.append(rng.hi + 1 if rng.hi_incl else rng.hi)
    return out


@pytest.mark.parametrize("path, f, tp, arm", RANGED_FIELDS, ids=[p + ("@arm" if a else "") for p, *_, a in RANGED_FIELDS])
def test_every_ranged_field_rejects_values_out_of_range(path, f, tp, arm):
    rng = f.metadata["range"]
    item = _list_item(tp)
    for v in _outside(rng):
        v = int(v) if float(v).is_integer() else v
        msg = _one_line_error(_override(path, arm, f"[{v}]" if item is not None else str(v)))
        assert path in msg and "out of range" in msg and str(rng) in msg, msg


def test_other_modules_use_the_same_vocabularies():
    from indistill import evaluate, prune, stages
    from indistill.methods import PKT_VARIANTS

    assert (prune.IMPORTANCE_MODES, prune.RESIZE_MODES, prune.PRUNED_BN_MODES) == (
        C.IMPORTANCE_MODES, C.RESIZE_MODES, C.PRUNED_BN_MODES)
    assert (evaluate.METRICS, evaluate.PROTOCOLS) == (C.RETRIEVAL_METRICS, C.PROTOCOLS)
    assert stages.OPTIMIZER_RESETS == C.OPTIMIZER_RESETS
    assert PKT_VARIANTS is C.PKT_VARIANTS
    assert tuple(C.REFERENCES) == C.REFERENCE_MODES


def test_the_reference_shows_each_constraint():
    ref = C.config_reference()
    assert "| `precision` | auto \\| fp32 \\| bf16 \\| fp16 |" in ref
    assert "| `student.train.optimizer.lr` | float, > 0 |" in ref
    assert "| `warmup.phase_epochs` | list[int] \\| None, each >= 1 |" in ref
    assert "| `kd.method` | str, a registered method |" in ref
    assert "| `evaluate.metrics` | list of cosine \\| euclidean |" in ref


# ---------------------------------------------------------------- one spelling of PKT's variant


def test_pkt_original_is_read_as_pkt_with_pkt_variant_original(tmp_path):
    cfg = load_config(None, ["warmup.embedding_loss=pkt_original"])
    assert (cfg.warmup.embedding_loss, cfg.warmup.pkt_variant) == ("pkt", "original")
    p = tmp_path / "c.yaml"
    p.write_text("warmup: {embedding_epochs: 2, embedding_loss: pkt_original}\n")
    assert load_config(p) == load_config(None, ["warmup.embedding_epochs=2", "warmup.pkt_variant=original"])
    assert "pkt_original" not in dump_config(load_config(p))
    for bad in (["warmup.embedding_loss=pkt_original", "warmup.pkt_variant=reference"],
                ["warmup={tap_loss: pkt, embedding_loss: pkt_original}"]):
        with pytest.raises(UserError, match="pkt_variant"):
            load_config(None, bad)


def test_the_warmup_pkt_loss_follows_pkt_variant():
    import torch

    from indistill.methods import pkt_loss
    from indistill.warmup import WARMUP_LOSSES

    assert "pkt_original" not in WARMUP_LOSSES  # one spelling: warmup.pkt_variant
    s, t = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), torch.randn(6, 5)
    for variant in C.PKT_VARIANTS:
        spec = load_config(None, [f"warmup.pkt_variant={variant}"]).warmup
        got = WARMUP_LOSSES.get("pkt").bind(spec).fn(s, t)
        assert torch.equal(got, pkt_loss(s, t, variant=variant))
    assert WARMUP_LOSSES.get("mse").bind(spec) is WARMUP_LOSSES.get("mse")


def test_a_run_made_with_pkt_original_still_compares_equal(tmp_path):
    from indistill.rundir import RunDir

    old = to_dict(load_config(None, [f"out_dir={tmp_path}", "name=r"]))
    old["warmup"]["embedding_loss"] = "pkt_original"
    del old["warmup"]["pkt_variant"]
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    cfg = load_config(None, [f"out_dir={tmp_path}", "name=r", "warmup.pkt_variant=original"])
    assert RunDir(tmp_path / "r").check(cfg) == []
    assert RunDir(tmp_path / "r").check(load_config(None, [f"out_dir={tmp_path}", "name=r"])) == ["warmup"]


COMMITTED = sorted((ROOT / "docs" / "results").rglob("config.yaml"))


@pytest.mark.skipif(not COMMITTED, reason="no committed run directories")
def test_committed_run_directories_still_load_and_compare_equal(tmp_path):
    from indistill.rundir import RunDir, _as_current

    for path in COMMITTED:
        old = yaml.safe_load(path.read_text())
        cfg = config_from_tree(old, where=str(path))  # validates under today's schema (a UserError fails here)
        assert _as_current(old) == to_dict(cfg), path
        run = tmp_path / "run"
        run.mkdir(exist_ok=True)
        (run / "config.yaml").write_text(path.read_text())
        assert RunDir(run).check(cfg) == [], path
        assert config_from_tree(yaml.safe_load(dump_config(cfg))) == cfg, path


# ---------------------------------------------------------------- top-level model / train


def test_model_and_train_are_left_out_of_a_written_config_at_their_defaults(tmp_path):
    tree = yaml.safe_load(dump_config(load_config(None, [])))
    assert "model" not in tree and "train" not in tree and "student" in tree
    cfg = load_config(None, ["train.epochs=3"])
    tree = yaml.safe_load(dump_config(cfg))
    assert tree["train"]["epochs"] == 3 and "model" not in tree
    assert config_from_tree(tree) == cfg  # read back: the defaults return
    assert "model" in to_dict(cfg) and "train" in to_dict(cfg)  # comparisons see everything
    help_ = {f.name: f.metadata["help"] for f in dataclasses.fields(Config)}
    assert "indistill train" in help_["model"] and "left out" in help_["train"]


def test_model_and_train_do_not_break_resume_either_way(tmp_path):
    from indistill.rundir import RunDir

    args = [f"out_dir={tmp_path}", "name=r"]
    (tmp_path / "r").mkdir()
    path = tmp_path / "r" / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(load_config(None, args)), sort_keys=False))  # as older runs wrote it
    assert "model:" in path.read_text()
    assert RunDir(tmp_path / "r").check(load_config(None, args)) == []
    path.write_text(dump_config(load_config(None, [*args, "train.epochs=5"])))  # an `indistill train` run
    assert RunDir(tmp_path / "r").check(load_config(None, args)) == ["train"]
    assert RunDir(tmp_path / "r").check(load_config(None, [*args, "train.epochs=5"])) == []
