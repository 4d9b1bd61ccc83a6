"""Smoke test of the benchmarks: each module's case builder runs one batch through the public API,
so a change to the stage builders or the Engine cannot silently break them again (tiny, in-process)."""

import pytest
import torch

from benchmarks import end_to_end, memory, throughput

# One intra-op thread: on the shared 2-core machine two threads stall in OpenMP barriers.
TINY = {"source": "random", "n_train": 96, "test_subset": 32, "batch_size": 16, "pair": "cnn", "threads": 1,
        "variant": "fp32", "data": "memory", "warm": 0, "batches": 1, "repeats": 1}


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # the cases set their own thread count; the rest of the suite keeps its own


@pytest.mark.parametrize("stage", throughput.STAGES)
def test_throughput_stage_case_runs_one_batch(stage):
    r = throughput.case_fn({**TINY, "kind": "stage", "stage": stage})
    assert r["images_per_s"]["n"] == 1 and r["images_timed"] == 16
    assert r["phase"] is None or r["phase"].startswith(("warmup:", "kd:"))
    if stage.startswith("warmup"):
        assert r["phase"] == ("warmup:embedding:pkt" if stage == "warmup_pkt" else "warmup:stage1:mse")
    if stage.startswith("kd:"):
        assert r["phase"] == stage


def test_throughput_interleaved_variants_and_phases():
    entries = [{"stage": "kd:pkt"}, {"stage": "kd:pkt", "variant": "channels_last"}, {"stage": "warmup:stage3"}]
    r = throughput.case_fn({**TINY, "kind": "interleaved", "entries": entries})
    assert set(r["ratio_to_ref"]) == {"kd:pkt", "kd:pkt/channels_last", "warmup:stage3"}
    assert r["ratio_to_ref"]["kd:pkt"]["median"] == 1.0
    assert r["phases"]["warmup:stage3"] == "warmup:stage3:mse"


def test_throughput_profile_case():
    r = throughput.case_fn({**TINY, "kind": "profile", "stage": "kd:pkt", "warm": 1, "top": 5})
    assert len(r["top_ops"]) == 5 and r["step_ms"] > 0


def test_memory_cases_run():
    assert memory.case_fn({**TINY, "kind": "baseline"})["max_rss_mb"] > 0
    r = memory.case_fn({**TINY, "kind": "stage", "stage": "kd:crd"})
    assert r["max_rss_mb"] > 0 and "error" not in r
    r = memory.case_fn({"kind": "retrieval", "shape": [200, 20, 8], "metric": "cosine", "protocol": "standard"})
    assert "error" not in r and r["wall_s"] > 0
    labels = {memory._label(c) for c in memory.cases(quick=True)}
    assert "cnn supervised" in labels and "cnn warmup_pkt" in labels


def test_end_to_end_quick_demo_config_validates_one_batch(tmp_path):
    from indistill.pipeline import Pipeline

    cfg = end_to_end.demo_config(quick=True, out_dir=str(tmp_path))
    assert cfg.student.train.epochs == 8 and cfg.warmup.a == 0
    Pipeline(cfg).validate(one_batch=True)  # every arm's loss, warmup phases included, on one batch


def test_case_matrices_name_known_stages():
    for c in throughput.cases(quick=False) + throughput.kd_cases(quick=True, ref="HEAD"):
        for e in c.get("entries", [c]):
            if "stage" in e:
                assert e["stage"] in throughput.STAGES or e["stage"].startswith("warmup:"), e
        assert throughput._label(c)


def _write_run(d, rows, wall, first="2026-01-01 10:00:00,000", last="2026-01-01 10:05:00,000"):
    import json

    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "results.json").write_text(json.dumps({"wall_time_s": wall, "models": {}}))
    (d / "log.txt").write_text(f"{first} [x] start\n{last} [x] end\n")


def test_grid_profile_reads_a_grid_directory(tmp_path):
    import json

    from benchmarks import grid_profile

    root = tmp_path / "g"
    _write_run(root / "shared", [{"stage": "teacher", "epoch": 1, "time_s": 10.0, "images_per_s": 100.0},
                                 {"stage": "teacher", "epoch": 2, "time_s": 30.0, "images_per_s": 200.0}], 60.0,
               last="2026-01-01 10:01:00,000")
    for seed, first, last in ((0, "10:01:00", "10:03:00"), (1, "10:03:00", "10:07:30")):
        _write_run(root / "cells" / f"s{seed}" / "a", [
            {"stage": "a", "epoch": 1, "phase": "warmup:stage1:mse", "time_s": 20.0, "images_per_s": 50.0},
            {"stage": "a", "epoch": 2, "phase": "kd:pkt", "time_s": 70.0 + 10 * seed, "images_per_s": 10.0},
            {"stage": "a", "epoch": 2, "phase": "kd:pkt", "test_top1": 50.0},  # no time_s: not an epoch row
        ], 100.0 + 20 * seed, first=f"2026-01-01 {first},000", last=f"2026-01-01 {last},000")
    (root / "grid.json").write_text(json.dumps({"workers": 2, "threads": 1, "command": "c", "wall_time_s": 400,
                                                "config": {"arms": [{"name": "a"}]}}))
    p = grid_profile.profile_grid(root, target_min=3.0)
    src = p["sources"]
    assert src["train_s"] == 40.0 and src["other_s"] == 20.0
    assert src["phases"]["teacher"]["images_per_s"] == pytest.approx((10 * 100 + 30 * 200) / 40)
    a = p["arms"]["a"]
    assert a["cells"] == 2 and a["wall_s"] == 110.0 and a["train_s"] == 95.0
    assert a["phases"]["kd:pkt"]["train_s_per_cell"] == 75.0
    assert a["phases"]["kd:pkt"]["images_per_s"] == pytest.approx(10.0)
    assert a["phases"]["warmup:stage1"]["epochs_per_cell"] == 1
    assert p["elapsed_s_from_logs"] == 450.0  # 10:00:00 -> 10:07:30
    assert p["cells_worker_s"] == 220.0 and p["cells_makespan_s"] == 120.0  # two cells on two workers
    assert p["target_left_for_cells_s"] == 120.0 and p["cells_speedup_needed"] == 1.0
    assert p["overall_speedup_needed"] == pytest.approx(180.0 / 180.0)
    assert "| a | 2 |" in "\n".join(grid_profile.render({"grids": {"g": p}}))


def test_list_schedule_starts_each_cell_on_the_first_free_worker():
    from benchmarks.grid_profile import list_schedule

    assert list_schedule([5, 3, 3, 3], 2) == 8  # w1: 0-5, w2: 0-3, w2: 3-6, w1 (free first): 5-8
    assert list_schedule([4], 3) == 4 and list_schedule([1, 1, 1], 1) == 3


def test_retrieval_result_path_keeps_blas_kernel_runs_apart(monkeypatch):
    from benchmarks import retrieval

    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    assert retrieval.result_path(False).name == "retrieval.json"
    assert retrieval.result_path(True).name == "retrieval_quick.json"
    monkeypatch.setenv("OPENBLAS_CORETYPE", "SkylakeX")
    assert retrieval.result_path(False).name == "retrieval_openblas_skylakex.json"
    assert "OPENBLAS_CORETYPE=SkylakeX " in retrieval._command()


def test_machine_info_names_numpys_blas_kernels():
    from benchmarks.common import _machine_line, machine_info

    info = machine_info()
    assert info["blas"] and all(b["library"] and b["threads"] >= 1 for b in info["blas"])
    line = _machine_line({"machine": info, "load_before": [0.1], "load_after": [0.2], "date": "d"})
    assert f"{info['blas'][0]['library']} {info['blas'][0]['version']}" in line


@pytest.mark.parametrize("stage", ["supervised", "kd:pkt"])
def test_engine_overhead_case_times_engine_and_bare_loop(stage):
    from benchmarks import engine_overhead

    r = engine_overhead.case_fn({"kind": "overhead", "stage": stage, "batch_size": 16, "batches": 2, "rounds": 2,
                                 "warm_rounds": 1, "threads": 1})
    assert r["stage"] == stage and r["rounds"] == 2 and r["batches_per_round"] == 2
    for key in ("engine_ms_per_step", "engine_inner_ms_per_step", "bare_ms_per_step", "ratio"):
        assert r[key]["n"] == 2 and r[key]["median"] > 0, key
    assert set(r["bare"]) == set(engine_overhead.BARE[stage]) and "bare" in r["bare"]
    for name, v in r["bare"].items():
        assert v["ms_per_step"]["median"] > 0 and v["ratio"]["n"] == 2 and len(r["rounds_s"][name]) == 2
        assert v["cpu_ms_per_step"]["median"] > 0 and v["ratio_cpu"]["median"] > 0
        # same weights, batches and optimizer: every loop took the very same steps as the engine
        assert v["max_param_diff_vs_engine"] < 1e-5, name
    assert len(r["rounds_s"]["engine"]) == 2
    assert r["optimizer"] and r["summary"].startswith("engine ")


def test_engine_overhead_label_names_the_result_file_and_readme_section(tmp_path, monkeypatch):
    import json

    from benchmarks import __main__ as runner, common, engine_overhead

    case = {"kind": "overhead", "stage": "supervised", "batch_size": 16, "batches": 1, "rounds": 2, "warm_rounds": 0,
            "threads": 1}
    monkeypatch.setattr(engine_overhead, "run", lambda quick: {"cases": [{**engine_overhead.case_fn(case), "case": case}],
                                                               "goal_ratio_max": engine_overhead.GOAL})
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(runner, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(runner, "README", tmp_path / "README.md")
    assert runner.main(["--only", "engine_overhead", "--label", "before", "--note", "beside a grid"]) == 0
    payload = json.loads((tmp_path / "engine_overhead_before.json").read_text())
    assert payload["label"] == "before" and payload["note"] == "beside a grid" and payload["load_before"] is not None
    readme = (tmp_path / "README.md").read_text()
    assert "## engine_overhead_before" in readme and "_Note: beside a grid_" in readme
    assert "| supervised (ce) |" in readme and "could not render" not in readme
