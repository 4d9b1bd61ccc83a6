"""One way to extend everything (issue 20): the registry, and a user's module adding an optimizer, a warmup
loss and a retrieval metric through `plugins:`, run end to end."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from indistill.cli import main
from indistill.config import load_config
from indistill.errors import UserError
from indistill.evaluate import retrieval_metrics_multi
from indistill.registry import Registry

PLUGIN = textwrap.dedent('''
    """A user's extensions, outside the package."""
    import torch
    import torch.nn.functional as F

    from indistill.evaluate import RANK_METRICS
    from indistill.optim import OPTIMIZERS
    from indistill.warmup import WARMUP_LOSSES, WarmupLoss

    # a warmup loss: one registration
    WARMUP_LOSSES.add("smooth_l1", WarmupLoss(lambda s, t: F.smooth_l1_loss(s.flatten(1), t.flatten(1)), "sl1"))

    # a retrieval metric: one function of the relevant items' ranks
    RANK_METRICS.add("hit_at_1", lambda ranks: (ranks[:, 0] == 1).double())

    # an optimizer of one's own: one registration (torch.optim classes need none: see `rmsprop` below)
    CALLS = []

    @OPTIMIZERS.register("sgd_plain")
    def _sgd_plain(params, spec):
        CALLS.append(spec.lr)
        return torch.optim.SGD(params, lr=spec.lr)
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    import sys

    name = f"user_plugin_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    yield name
    sys.modules.pop(name, None)
    # the registries are process-wide: forget the plug-in's entries so other tests see the built-ins only
    from indistill.evaluate import RANK_METRICS
    from indistill.optim import OPTIMIZERS
    from indistill.warmup import WARMUP_LOSSES

    for reg, key in ((WARMUP_LOSSES, "smooth_l1"), (RANK_METRICS, "hit_at_1"), (OPTIMIZERS, "sgd_plain")):
        reg._entries.pop(key, None)


def test_registry_duplicates_suggestions_aliases_and_lazy_loading():
    loaded = []
    reg: Registry[int] = Registry("widget", loader=lambda: (loaded.append(1), reg.add("gear", 1, aliases=("cog",))))
    assert loaded == []  # nothing loads until the registry is used
    assert reg.get("cog") == 1 and reg.canonical("cog") == "gear" and loaded == [1]
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("cog", 2)
    with pytest.raises(UserError, match=r"unknown widget 'gaer' \(did you mean: gear\?\); known: gear"):
        reg.get("gaer")
    assert reg.names() == ["gear"] and "cog" in reg and "spring" not in reg


def test_config_names_are_checked_against_the_registries():
    with pytest.raises(UserError, match="optimizer 'adamm'.*did you mean"):
        load_config(None, ["student.train.optimizer.name=adamm"])
    with pytest.raises(UserError, match="warmup loss 'msee'"):
        load_config(None, ["warmup.tap_loss=msee"])
    with pytest.raises(UserError, match=r"evaluate.extra_metrics\[0\].*'mrrr'"):
        load_config(None, ["evaluate.extra_metrics=[mrrr]"])
    with pytest.raises(UserError, match="plugins: cannot import 'no_such_module_here'"):
        load_config(None, ["plugins=[no_such_module_here]"])
    cfg = load_config(None, ["student.train.optimizer.name=nadam", "student.train.scheduler.name=exponential",
                             "student.train.scheduler.kwargs={gamma: 0.5}"])
    from indistill.optim import build_optimizer, build_scheduler

    opt = build_optimizer(torch.nn.Linear(2, 2).parameters(), cfg.student.train.optimizer)
    assert type(opt) is torch.optim.NAdam
    sched = build_scheduler(opt, cfg.student.train.scheduler, 10)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_rank_metrics_by_hand():
    # 2 classes, 2 items each; the queries' rankings are known: check mrr and r_precision by hand
    db = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.2, 0.8]], dtype=torch.float64)
    dl = torch.tensor([0, 1, 1, 0])
    q = torch.tensor([[1.0, 0.05], [0.1, 1.0]], dtype=torch.float64)
    ql = torch.tensor([0, 1])
    r = retrieval_metrics_multi(db, dl, q, ql, ks=(1,), protocols=("standard",), extra=("mrr", "r_precision"))
    # cosine: query 0 ranks db 0 (rel), 1, 3 (rel), 2 -> first hit at 1, 1 of 2 relevant in the top 2
    # query 1 ranks db 2 (rel), 3, 1 (rel), 0 -> first hit at 1, 1 of 2 in the top 2
    assert r["standard"]["mrr"] == pytest.approx(1.0)
    assert r["standard"]["r_precision"] == pytest.approx(0.5)


def test_a_users_optimizer_warmup_loss_and_metric_run_end_to_end(plugin, tmp_path, capsys, monkeypatch):
    import sys

    made = []
    init = torch.optim.RMSprop.__init__
    monkeypatch.setattr(torch.optim.RMSprop, "__init__", lambda self, *a, **k: (made.append(k), init(self, *a, **k))[1])
    args = [
        "run", "configs/demo_digits.yaml", f"out_dir={tmp_path}", "name=plug", f"plugins=[{plugin}]",
        "teacher.train.epochs=1", "teacher.train.optimizer.name=sgd_plain", "warmup.a=0",
        "student.train.epochs=7", "student.train.optimizer.name=rmsprop", "warmup.tap_loss=smooth_l1",
        "evaluate.extra_metrics=[hit_at_1, mrr]", "evaluate.protocols=[standard]", "evaluate.metrics=[cosine]",
        "arms=[{name: indistill_pkt, warmup: indistill}]", "data.train_subset=200", "data.test_subset=60",
        "progress=false", "device=cpu",
    ]
    assert main(args) == 0, capsys.readouterr().err
    run = tmp_path / "plug"
    res = json.loads((run / "results.json").read_text())["models"]["indistill_pkt"]
    assert 0 <= res["retrieval/cosine/standard/hit_at_1"] <= 1
    assert 0 < res["retrieval/cosine/standard/mrr"] <= 1
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    student = [r for r in rows if r["stage"] == "indistill_pkt"]
    assert "loss/sl1/stage1" in student[0] and "loss/sl1/stage2" in student[1]
    assert sys.modules[plugin].CALLS == [1e-3]  # the teacher trained with the plug-in's optimizer
    assert [k["lr"] for k in made] == [1e-3]  # the student with torch.optim.RMSprop, found by name


def test_a_users_optimizer_warmup_loss_and_metric_in_a_grid(plugin, tmp_path, capsys):
    # the same three through `indistill grid`: its cells run in subprocesses that import the plug-in
    # themselves, and the plug-in's metric is summarised in grid.json and grid.md like the built-ins
    import sys

    args = [
        "grid", "configs/demo_digits.yaml", "--seeds", "1", "--workers", "1", "--threads", "1",
        f"out_dir={tmp_path}", "name=g", f"plugins=[{plugin}]",
        "teacher.train.epochs=1", "teacher.train.optimizer.name=sgd_plain", "warmup.phase_epochs=[1, 1, 1]",
        "student.train.epochs=4", "student.train.optimizer.name=rmsprop", "warmup.tap_loss=smooth_l1",
        "evaluate.extra_metrics=[hit_at_1]", "evaluate.protocols=[standard]",
        "arms=[{name: indistill_pkt, warmup: indistill, method: pkt}]", "data.train_subset=200",
        "data.test_subset=60",
    ]
    assert main(args) == 0, capsys.readouterr().err
    assert sys.modules[plugin].CALLS == [1e-3]  # the shared teacher trained with the plug-in's optimizer
    cell = tmp_path / "g" / "cells" / "s0" / "indistill_pkt"
    rows = [json.loads(x) for x in (cell / "metrics.jsonl").read_text().splitlines()]
    assert "loss/sl1/stage1" in [r for r in rows if r["stage"] == "indistill_pkt"][0]
    key = "retrieval/cosine/standard/hit_at_1"
    value = json.loads((cell / "results.json").read_text())["models"]["indistill_pkt"][key]
    summary = json.loads((tmp_path / "g" / "grid.json").read_text())["summary"]
    assert key in summary["metrics"] and summary["arms"]["indistill_pkt"][key]["values"] == [value]
    md = (tmp_path / "g" / "grid.md").read_text()
    assert next(x for x in md.splitlines() if x.startswith("| arm |")).endswith(" | hit_at_1 cos | hit_at_1 euc |")


def test_data_kwargs_reach_the_dataset(tmp_path):
    from indistill.pipeline import load_data

    cfg = load_config(None, ["data.name=digits", "data.kwargs={image_size: 28}", "data.train_subset=100",
                             "data.test_subset=50"])
    assert load_data(cfg).image_size == 28
    with pytest.raises(UserError, match="sharpness"):
        load_data(load_config(None, ["data.kwargs={sharpness: 2}"]))
