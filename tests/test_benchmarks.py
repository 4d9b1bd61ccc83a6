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
