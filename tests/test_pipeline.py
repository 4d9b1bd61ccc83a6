"""Pipeline-level behaviour: one budget per arm, exact resume at every boundary, the warmup factory."""

import json

import pytest
import torch
from safetensors.torch import load_file

from indistill.cli import main
from indistill.engine import Engine

BASE = [
    "data.name=digits", "data.train_subset=300", "data.test_subset=100", "progress=false", "device=cpu",
    "teacher.name=cnn32", "student.name=cnn32_small", "teacher.train.epochs=1", "evaluate.protocols=[standard]",
    "evaluate.metrics=[cosine]", "name=r",
]
ARGS = [*BASE, "warmup.phase_epochs=[1, 2, 2]", "warmup.embedding_epochs=1", "student.train.epochs=7", "kd.method=kd"]


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _same_exports(a, b):
    for f in sorted((a / "export").glob("*.safetensors")):
        x, y = load_file(str(f)), load_file(str(b / "export" / f.name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f.name


def test_killed_inside_a_warmup_phase_resumes_exactly(tmp_path, monkeypatch, capsys):
    assert main(["run", "--defaults", *ARGS, f"out_dir={tmp_path / 'full'}"]) == 0

    real_epoch = Engine.run_epoch
    state = {"fired": False}

    def dying_epoch(self, stage, epoch, st, split=None):
        # the second epoch of the stage2 phase (epochs 1-2): a kill in the middle of a phase
        if stage.name == "student" and epoch == 2 and not state["fired"]:
            state["fired"] = True
            raise KeyboardInterrupt
        return real_epoch(self, stage, epoch, st, split)

    monkeypatch.setattr(Engine, "run_epoch", dying_epoch)
    assert main(["run", "--defaults", *ARGS, f"out_dir={tmp_path / 'cut'}"]) == 130
    assert "re-run the same command to resume" in capsys.readouterr().err
    run = tmp_path / "cut" / "r"
    assert [r["phase"] for r in _rows(run) if r["stage"] == "student"] == ["warmup:stage1:mse", "warmup:stage2:mse"]
    assert main(["run", "--defaults", *ARGS, f"out_dir={tmp_path / 'cut'}"]) == 0
    assert [r["phase"] for r in _rows(run) if r["stage"] == "student"] == [
        "warmup:stage1:mse", "warmup:stage2:mse", "warmup:stage2:mse", "warmup:stage3:mse", "warmup:stage3:mse",
        "warmup:embedding:pkt", "kd:kd"]
    _same_exports(tmp_path / "full" / "r", run)


def test_arms_with_and_without_warmup_share_one_budget_and_schedule(tmp_path):
    """Both arms: the same number of student epochs under the same per-epoch learning rate."""
    arms = "arms=[{name: kd, warmup: none, method: kd}, {name: indistill_kd, warmup: indistill, method: kd}]"
    assert main(["run", "--defaults", *BASE, "warmup.a=0", "student.train.epochs=8", "student.train.optimizer.lr=0.002",
                 "student.train.scheduler={name: multistep, milestones: [6], gamma: 0.1}", arms,
                 f"out_dir={tmp_path}"]) == 0
    rows = _rows(tmp_path / "r")
    plain = [r for r in rows if r["stage"] == "kd"]
    warm = [r for r in rows if r["stage"] == "indistill_kd"]
    assert len(plain) == len(warm) == 8
    assert [r["lr"] for r in plain] == [r["lr"] for r in warm] == pytest.approx([0.002] * 6 + [0.0002] * 2)
    assert [r["phase"] for r in warm] == ["warmup:stage1:mse", "warmup:stage2:mse", "warmup:stage2:mse"] + \
        ["warmup:stage3:mse"] * 3 + ["kd:kd"] * 2
    assert {r["phase"] for r in plain} == {"kd:kd"}
    # the checkpoint knows what it holds, and `indistill evaluate RUN_DIR` needs no model.name
    ck = torch.load(tmp_path / "r" / "checkpoints" / "indistill_kd.pt", weights_only=True)
    assert ck["meta"]["arch"] == "cnn32_small" and ck["meta"]["dataset"] == "digits"
    assert ck["meta"]["warmup_epochs"] == 6 and ck["meta"]["method"] == "kd"
    before = (tmp_path / "r" / "results.json").read_text()
    assert main(["evaluate", str(tmp_path / "r" / "checkpoints" / "kd.pt"), "data.train_subset=300",
                 "data.test_subset=100", "evaluate.protocols=[standard]"]) == 0
    assert (tmp_path / "r" / "results.json").read_text() == before  # the run's own results are untouched
    ev = json.loads((tmp_path / "r" / "eval" / "kd" / "results.json").read_text())["models"]["kd"]
    assert ev["top1"] == pytest.approx(json.loads(before)["models"]["kd"]["top1"])


def test_warmup_longer_than_the_budget_is_an_error(tmp_path, capsys):
    assert main(["run", "--defaults", *BASE, "warmup.a=2", "student.train.epochs=10", f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "warmup takes 12 epochs" in err and "student.train.epochs=10" in err
    assert not (tmp_path / "r" / "config.yaml").exists()  # a failed start claims nothing


def test_logit_kd_needs_no_stage_taps(tmp_path, capsys):
    """`Method.uses` drives the taps: plain KD pairs only the logits, so a student without stage taps works."""
    taps = "{embedding: '4:in', logits: '@output'}"
    code = main(["run", "--defaults", *BASE, "student.name=tests.user_models:make_net", f"student.taps={taps}",
                 "student.kwargs={width: 4}", "warmup=none", "kd.method=kd", "student.train.epochs=1",
                 f"out_dir={tmp_path}"])
    assert code == 0, capsys.readouterr().err


def test_prune_command_shows_the_channels_the_run_used(tmp_path, capsys):
    args = [*BASE, "warmup.a=0", "student.train.epochs=6", f"out_dir={tmp_path}"]
    assert main(["prune", *args]) == 0
    assert "UNTRAINED teacher" in capsys.readouterr().out
    assert main(["run", "--defaults", *args]) == 0
    capsys.readouterr()
    assert main(["prune", *args]) == 0
    out = capsys.readouterr().out
    assert "pruning the trained teacher" in out
    assert not (tmp_path / "r" / "prune.json").exists()  # nothing is written into a finished run unasked
    assert main(["prune", *args, f"--out={tmp_path / 'prune.json'}"]) == 0
    shown = json.loads((tmp_path / "prune.json").read_text())["kept"]
    used = json.loads((tmp_path / "r" / "prune_student.json").read_text())["kept"]
    assert shown == used and {k: len(v) for k, v in used.items()} == {"stage1": 8, "stage2": 16, "stage3": 32}


BOUNDARY_ARMS = ("arms=[{name: fitnet, warmup: indistill, method: fitnet}, {name: vid, warmup: none, method: vid}, "
                 "{name: crd, warmup: indistill, method: crd, params: {nce_k: 64}}]")


@pytest.mark.parametrize("kill", ["teacher", "fitnet", "vid", "fitnet@3", "crd@3"])
def test_kill_at_every_stage_boundary_resumes_bit_identical(tmp_path, monkeypatch, capsys, kill):
    """FitNet's regressor, VID's heads and CRD's embeddings and memory are drawn from (seed, stage), so a
    run killed after any stage (or at an arm's warmup -> KD boundary) re-runs to the same weights."""
    args = [*BASE, "warmup.phase_epochs=[1, 1, 1]", "student.train.epochs=5", BOUNDARY_ARMS]
    assert main(["run", "--defaults", *args, f"out_dir={tmp_path / 'full'}"]) == 0
    stage, _, epoch = kill.partition("@")
    if epoch:  # after the warmup's last epoch is checkpointed, before the first KD epoch
        real = Engine.end_epoch

        def dying(self, st, e, state, row):
            out = real(self, st, e, state, row)
            if st.name == stage and e + 1 == int(epoch):
                raise KeyboardInterrupt
            return out

        monkeypatch.setattr(Engine, "end_epoch", dying)
    else:  # after the stage's final checkpoint is written
        real = Engine.finish

        def dying(self, st, summary):
            out = real(self, st, summary)
            if st.name == stage:
                raise KeyboardInterrupt
            return out

        monkeypatch.setattr(Engine, "finish", dying)
    assert main(["run", "--defaults", *args, f"out_dir={tmp_path / 'cut'}"]) == 130
    monkeypatch.undo()
    assert main(["run", "--defaults", *args, f"out_dir={tmp_path / 'cut'}"]) == 0
    _same_exports(tmp_path / "full" / "r", tmp_path / "cut" / "r")
    for name in ("fitnet", "vid", "crd"):
        a = torch.load(tmp_path / "full" / "r" / "checkpoints" / f"{name}.pt", weights_only=True)["extra"]
        b = torch.load(tmp_path / "cut" / "r" / "checkpoints" / f"{name}.pt", weights_only=True)["extra"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    full = json.loads((tmp_path / "full" / "r" / "results.json").read_text())["models"]
    cut = json.loads((tmp_path / "cut" / "r" / "results.json").read_text())["models"]
    assert {k: v["top1"] for k, v in full.items()} == {k: v["top1"] for k, v in cut.items()}


def test_a_rerun_that_trains_nothing_leaves_the_results_as_they_were(tmp_path):
    args = ["run", "--defaults", *BASE, "warmup=none", "kd.method=kd", "student.train.epochs=1", f"out_dir={tmp_path}"]
    assert main(args) == 0
    run = tmp_path / "r"
    before = {f: (run / f).read_bytes() for f in ("results.json", "results.md")}
    assert json.loads(before["results.json"])["wall_time_s"] > 0
    assert main(args) == 0  # every stage had finished: nothing trained, nothing rewritten ("Wall time: 0.0 min")
    assert {f: (run / f).read_bytes() for f in before} == before


def test_write_report_keeps_the_wall_time_of_the_invocation_that_trained(tmp_path):
    from indistill.report import write_report

    models = {"m": {"top1": 90.0, "role": "student", "model": "cnn32_small", "params": 14906}}
    write_report(tmp_path, models, command="indistill run a.yaml", wall_time_s=600.0)
    first = (tmp_path / "results.json").read_bytes()
    write_report(tmp_path, models, command="indistill run a.yaml", wall_time_s=0.4, trained=False)
    assert (tmp_path / "results.json").read_bytes() == first
    # results that changed without training (other evaluation settings): written, with training's wall time
    write_report(tmp_path, {"m": {**models["m"], "top1": 91.0}}, command="indistill run a.yaml", wall_time_s=0.4,
                 trained=False)
    assert json.loads((tmp_path / "results.json").read_text())["wall_time_s"] == 600.0
    assert "Wall time: 10.0 min (of the invocation that trained" in (tmp_path / "results.md").read_text()


def _capture_figures(monkeypatch) -> list:
    import matplotlib

    matplotlib.use("Agg")
    from indistill import report

    figures: list = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path, dpi=110: figures.append(fig))
    return figures


def test_training_plot_keeps_phase_labels_off_the_title_and_shows_top1_in_the_legend(tmp_path, monkeypatch):
    from indistill.report import plot_training

    figures = _capture_figures(monkeypatch)
    rows = [{"stage": "arm", "epoch": e, "phase": "warmup:stage1:mse" if e <= 2 else "kd:kd",
             **({"loss/mse/stage1": 1.0 / e} if e <= 2 else {"loss/kd": 2.0 / e}),
             **({"test_top1": 50.0 + e} if e % 2 == 0 else {})} for e in range(1, 7)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    plot_training(tmp_path / "metrics.jsonl", tmp_path)
    (fig,) = figures
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["kd", "mse/stage1", "test top-1 (right axis)", "phase: stage1:mse", "phase: kd"]
    assert not any(ax.texts for ax in fig.axes)  # no label drawn over the plot or its title
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # the closed figure's own canvas no longer renders
    canvas.draw()
    renderer = canvas.get_renderer()
    ax = fig.axes[0]
    title, box = ax.title.get_window_extent(renderer), legend.get_window_extent(renderer)
    assert not title.overlaps(box) and not ax.get_window_extent(renderer).overlaps(box)


def test_pr_curves_zoom_to_their_range(tmp_path, monkeypatch):
    from indistill.report import plot_pr_curves

    figures = _capture_figures(monkeypatch)
    curve = {"recall": [0.0, 0.5, 1.0], "precision": [0.99, 0.95, 0.85]}
    models = {"m": {"retrieval/cosine/standard/map": 0.9, "retrieval/euclidean/standard/map": 0.9,
                    "pr_curves": {"cosine/standard": curve, "euclidean/standard": curve}}}
    assert plot_pr_curves(models, tmp_path / "pr.png") is not None
    (fig,) = figures
    for ax in fig.axes:
        low, high = ax.get_ylim()
        assert 0.8 < low < 0.85 and 0.99 < high < 1.0
