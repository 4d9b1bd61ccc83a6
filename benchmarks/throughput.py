"""Training throughput (images/s) of every stage, through the public Engine API.

A case builds its stage as ``indistill run`` does, with the stage builders and
:meth:`Pipeline.arm <indistill.pipeline.Pipeline.arm>` (:func:`build_stage`), and drives it with
``engine.begin(stage)`` + ``engine.run_epoch(stage, epoch, state, split=...)``, where ``split`` is a
fixed-size slice of the training set: the timed "epoch" is a fixed number of batches. Stages:

- ``supervised``: cross-entropy (:func:`~indistill.stages.supervised_stage`; the teacher, the
  auxiliary's first stage);
- ``aux_pkt``: the auxiliary's PKT stage (:func:`~indistill.stages.auxiliary_pkt_stage`; the pair's
  student plays the auxiliary, the pair's teacher the frozen teacher);
- ``warmup_mse`` / ``warmup_pkt``: an InDistill arm's warmup epochs (epoch 0: stage1 MSE; with
  ``warmup.embedding_epochs=1``, its last warmup epoch: the embedding PKT phase); ``warmup:stage2``
  etc.: the first epoch of that tap's phase;
- ``kd:<method>``: an arm without warmup in a KD epoch; ``kd:ce`` is the cross-entropy arm (no
  source forward), ``kd:pkt`` the PKT reference variant.

Data: Fashion-MNIST (60k x 1x32x32, random crop + flip) when installed, else random uint8 images of
that shape; the models are randomly initialised (speed does not depend on the weights). CRD sees
the full 60k-sample memory bank even though only a few batches are timed.

Case kinds (each case runs in its own interpreter, see :mod:`benchmarks.common`): ``stage`` (one
stage, repeats), ``interleaved`` (several stages / variants / code versions timed in rounds in one
process, so their ratios do not depend on the machine's load), ``procs`` (2 processes x 1 thread
vs 1 process x 2 threads on the KD step), ``profile`` (where a step's time goes) and ``accuracy``.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import ROOT, case_main, load_average, run_cases, summarize, table

PAIRS = {"cnn": ("cnn32", "cnn32_small"), "resnet": ("resnet56", "resnet20")}
STAGES = ["supervised", "aux_pkt", "warmup_mse", "warmup_pkt", "kd:ce", "kd:kd", "kd:pkt", "kd:crd", "kd:dkd"]
VARIANTS = {
    "fp32": {"precision": "fp32", "channels_last": False, "compile": False},
    "channels_last": {"precision": "fp32", "channels_last": True, "compile": False},
    "bf16": {"precision": "bf16", "channels_last": False, "compile": False},
    "bf16_cl": {"precision": "bf16", "channels_last": True, "compile": False},
    "compile": {"precision": "fp32", "channels_last": False, "compile": True},
}
FULL_TRAIN = 60000
BASE_PKG = "indistill_base"


# -- inside the case subprocess --------------------------------------------------

def import_base(ref: str) -> str:
    """Import ``src/indistill`` as of git ``ref`` as the package ``indistill_base`` (for before/after
    cases timed in one process); returns the package name."""
    if BASE_PKG in sys.modules:
        return BASE_PKG
    tmp = Path(tempfile.mkdtemp(prefix="indistill_base_"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src/indistill"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    pkg = tmp / BASE_PKG
    shutil.move(str(tmp / "src" / "indistill"), pkg)
    for f in pkg.rglob("*.py"):  # the few absolute self-imports must stay inside the copy
        text = f.read_text()
        if "indistill." in text:
            f.write_text(text.replace("import indistill.", f"import {BASE_PKG}.").replace(
                "from indistill.", f"from {BASE_PKG}."))
    sys.path.insert(0, str(tmp))
    importlib.import_module(BASE_PKG)
    return BASE_PKG


def load_data(source: str = "auto", *, test_subset: int | None = 512, n_train: int = FULL_TRAIN,
              pkg: str = "indistill"):
    """``(DataSplits, source name)``: Fashion-MNIST when installed (``auto``), else (or with
    ``random``) random uint8 images of its shape (``n_train`` of them)."""
    import torch

    data_mod = importlib.import_module(f"{pkg}.data")
    memory = importlib.import_module(f"{pkg}.data.memory")
    errors = importlib.import_module(f"{pkg}.errors")
    if source in ("auto", "fashion_mnist"):
        try:
            return data_mod.get_dataset("fashion_mnist", test_subset=test_subset), "fashion_mnist"
        except errors.UserError:
            if source == "fashion_mnist":
                raise
    g = torch.Generator().manual_seed(0)
    nt = test_subset or 10000
    x = torch.randint(0, 256, (n_train, 1, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n_train,), generator=g)
    xt = torch.randint(0, 256, (nt, 1, 32, 32), dtype=torch.uint8, generator=g)
    yt = torch.randint(0, 10, (nt,), generator=g)
    return memory.make_in_memory_splits("random", 10, x, y, xt, yt, pad=4, flip=True), "random_uint8"


def subset(split, n: int):
    """The first ``n`` images of an in-memory split, with its augmentation (shared normalisation)."""
    cls = type(split)
    return cls(split.images[:n], split.labels[:n], split.mean, split.std, pad=split.pad, flip=split.flip)


@dataclass
class Built:
    """A stage ready to time: its engine, the epoch whose loss is timed and the engine's TrainState."""

    engine: Any
    stage: Any
    epoch: int
    phase: str | None
    state: Any = None
    keep: list[Any] = field(default_factory=list)  # objects that must outlive the stage (temp dirs)

    def begin(self) -> "Built":
        self.state = self.engine.begin(self.stage)
        return self

    def run(self, split) -> dict[str, Any]:
        """One "epoch" of ``stage`` over ``split`` through the engine's public loop; its metrics row."""
        return self.engine.run_epoch(self.stage, self.epoch, self.state, split=split)

    def close(self) -> None:
        close = getattr(self.stage, "close", None)
        if close is not None:
            close()
        for k in self.keep:
            k.cleanup()


def build_stage(case: dict[str, Any], data, *, pkg: str = "indistill") -> Built:
    """Build ``case["stage"]`` for ``case["pair"]`` under ``case["variant"]`` with the public builders
    of package ``pkg`` (``indistill``, or ``indistill_base`` for an older version); then ``.begin()``."""
    import torch

    config = importlib.import_module(f"{pkg}.config")
    pipeline = importlib.import_module(f"{pkg}.pipeline")
    stages = importlib.import_module(f"{pkg}.stages")
    teacher_name, student_name = PAIRS[case["pair"]]
    v = VARIANTS[case.get("variant", "fp32")]
    name = case["stage"]
    tmp = tempfile.TemporaryDirectory(prefix="indistill_bench_")
    overrides = [
        f"out_dir={tmp.name}", "name=bench", "progress=false", "seed=0",
        "device=cuda" if torch.cuda.is_available() else "device=cpu",
        f"precision={v['precision']}", f"channels_last={str(v['channels_last']).lower()}",
        f"data.batch_size={case.get('batch_size', 128)}", f"teacher.name={teacher_name}", f"student.name={student_name}",
        "loss_guard=0",
    ]
    if name == "warmup_pkt":
        overrides.append("warmup.embedding_epochs=1")
    cfg = config.load_config(None, overrides)
    pipe = pipeline.Pipeline(cfg, data=data)
    teacher, student = pipe.seeded_model(cfg.teacher), pipe.seeded_model(cfg.student)
    epoch = 0
    if name == "supervised":
        stage = stages.supervised_stage("supervised", student, cfg.student.train)
    elif name == "aux_pkt":
        stage = stages.auxiliary_pkt_stage(student, teacher, cfg.auxiliary.pkt, variant=cfg.auxiliary.pkt_variant)
    elif name in ("warmup_mse", "warmup_pkt") or name.startswith("warmup:"):
        stage = pipe.arm(config.ArmSpec(name="arm", warmup="indistill", method="pkt", params={}), teacher, student)
        if name == "warmup_pkt":
            epoch = int(stage.meta["warmup_epochs"]) - 1
        elif name.startswith("warmup:"):  # warmup:stage2 = the first epoch of the stage2 phase
            want = f"warmup:{name.split(':', 1)[1]}:"
            epoch = next(e for e in range(int(stage.meta["warmup_epochs"])) if stage.phase(e).startswith(want))
    elif name.startswith("kd:"):
        method = name.split(":", 1)[1]
        stage = pipe.arm(config.ArmSpec(name="arm", warmup="none", method=method, params={}), teacher, student)
    else:
        raise ValueError(f"unknown stage {name!r}; one of {STAGES}")
    if v["compile"]:
        stage.model.compile()
        for m in stage.frozen:
            inner = getattr(m, "teacher", None)  # a PrunedTeacher's forward adds hooks: compile its teacher
            (inner if isinstance(inner, torch.nn.Module) else m).compile()
    built = Built(pipe.engine, stage, epoch, stage.phase(epoch) if stage.phase else None, keep=[tmp])
    return built.begin()


def case_data(case: dict[str, Any], pkg: str = "indistill"):
    """``load_data`` as the case asks: ``source`` (auto | fashion_mnist | random) and, for random data,
    ``n_train`` images."""
    return load_data(case.get("source", "auto"), n_train=case.get("n_train", FULL_TRAIN),
                     test_subset=case.get("test_subset", 512), pkg=pkg)


def _threads(case: dict[str, Any]) -> None:
    import torch

    if case.get("threads"):
        torch.set_num_threads(int(case["threads"]))


def stage_case(case: dict[str, Any]) -> dict[str, Any]:
    """One (pair, stage, variant, data path) measurement: ``warm`` batches, then ``repeats`` x ``batches``."""
    import torch

    _threads(case)
    torch.manual_seed(0)
    data, source = case_data(case)
    bs = case.get("batch_size", 128)
    built = build_stage(case, data)
    out: dict[str, Any] = {"epoch_measured": built.epoch, "phase": built.phase}
    try:
        if case.get("data", "memory") == "memory":
            warm, meas = subset(data.train, case["warm"] * bs), subset(data.train, case["batches"] * bs)
        else:
            nw = int(case["data"].removeprefix("loader"))
            tr = data.train
            n = case["batches"] * bs
            warm = meas = LoaderSplit(tr.images[:n], tr.labels[:n], tr.mean, tr.std, nw, bs)
        t0 = time.perf_counter()
        try:
            if case["warm"]:
                built.run(warm)
        except Exception as e:  # torch.compile failures are results, not crashes
            if case.get("variant") == "compile":
                return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
            raise
        out["warmup_s"] = time.perf_counter() - t0
        ips, times, losses = [], [], []
        budget = case.get("budget_s")
        for _ in range(case["repeats"]):
            row = built.run(meas)
            ips.append(row["images_per_s"])
            times.append(row["time_s"])
            losses.append(row["loss"])
            if budget is not None and sum(times) > budget:
                break  # a loaded machine gets fewer repeats rather than a run that never ends
    finally:
        built.close()
    out.update({"images_per_s": summarize(ips), "time_s": summarize(times), "images_timed": len(meas),
                "loss_last": losses[-1] if losses else None, "data_source": source,
                "torch_threads": torch.get_num_threads()})
    if case.get("variant") == "compile":
        from torch._dynamo.utils import counters

        out["graph_breaks"] = int(sum(counters["graph_break"].values()))
        out["unique_graphs"] = int(counters["stats"].get("unique_graphs", 0))
    out["summary"] = f"{out['images_per_s']['median']:.0f} img/s"
    return out


def _entry_key(e: dict[str, Any]) -> str:
    key = f"{e['stage']}"
    if e.get("variant", "fp32") != "fp32":
        key += f"/{e['variant']}"
    if e.get("pair", "cnn") != "cnn":
        key = f"{e['pair']}:{key}"
    if e.get("code") == "base":
        key += "@base"
    return key


def interleaved_case(case: dict[str, Any]) -> dict[str, Any]:
    """Several entries (stage x variant x code version) built in one process and timed in rounds
    (A, B, C, A, B, C, ...) on the same batches; ratios are taken within each round.

    An entry with ``"code": "base"`` runs the stage built by ``src/indistill`` as of git
    ``case["base_ref"]`` (imported as ``indistill_base``), with that version's data pipeline: the
    before/after measurement of a performance change. ``case["ref"]`` names the entry every other
    entry's time is divided by (default: the first)."""
    import torch

    _threads(case)
    bs = case.get("batch_size", 128)
    entries = case["entries"]
    pkgs = {"current": "indistill"}
    if any(e.get("code") == "base" for e in entries):
        pkgs["base"] = import_base(case["base_ref"])
    datas = {code: case_data(case, pkg) for code, pkg in pkgs.items()}
    built: dict[str, Built] = {}
    splits: dict[str, tuple[Any, Any]] = {}
    try:
        for e in entries:
            code = e.get("code", "current")
            data = datas[code][0]
            torch.manual_seed(0)
            built[_entry_key(e)] = build_stage({**case, **e}, data, pkg=pkgs[code])
            splits[_entry_key(e)] = (subset(data.train, case["warm"] * bs), subset(data.train, case["batches"] * bs))
        for key, b in built.items():
            b.run(splits[key][0])
        times: dict[str, list[float]] = {k: [] for k in built}
        losses: dict[str, list[float]] = {k: [] for k in built}
        for _ in range(case["repeats"]):
            for key, b in built.items():
                row = b.run(splits[key][1])
                times[key].append(row["time_s"])
                losses[key].append(row["loss"])
    finally:
        for b in built.values():
            b.close()
    ref = _entry_key(case["ref"]) if case.get("ref") else next(iter(built))
    n_img = case["batches"] * bs
    out: dict[str, Any] = {
        "time_s": {k: summarize(v) for k, v in times.items()},
        "images_per_s": {k: summarize([n_img / t for t in v]) for k, v in times.items()},
        "ratio_to_ref": {k: summarize([t / r for t, r in zip(v, times[ref])]) for k, v in times.items()},
        "ref": ref, "rounds_time_s": times, "losses": losses, "data_source": datas["current"][1],
        "torch_threads": torch.get_num_threads(),
        "phases": {k: b.phase for k, b in built.items()},
    }
    out["summary"] = " ".join(f"{k} x{v['median']:.2f}" for k, v in out["ratio_to_ref"].items() if k != ref)
    return out


def loop_case(case: dict[str, Any]) -> dict[str, Any]:
    """Train one stage for ``seconds`` of wall time (whole passes of ``batches`` batches); images/s.
    The worker of :func:`procs_case`."""
    import torch

    _threads(case)
    data, source = case_data(case)
    bs = case.get("batch_size", 128)
    built = build_stage(case, data)
    try:
        split = subset(data.train, case["batches"] * bs)
        built.run(subset(data.train, bs))
        start = case.get("start_at")
        if start:  # the parent starts both workers of a round at the same instant
            time.sleep(max(0.0, start - time.time()))
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < case["seconds"]:
            built.run(split)
            n += len(split)
        wall = time.perf_counter() - t0
    finally:
        built.close()
    from .common import max_rss_mb

    return {"images": n, "wall_s": wall, "images_per_s": n / wall, "torch_threads": torch.get_num_threads(),
            "data_source": source, "max_rss_mb": max_rss_mb()}


def procs_case(case: dict[str, Any]) -> dict[str, Any]:
    """The KD step as a 2-worker grid runs it (2 processes x 1 thread, total images/s) vs one process
    with 2 intra-op threads; rounds alternate A, B, A, B so both see the same load."""
    from .common import run_case

    rounds: list[dict[str, Any]] = []
    worker = {k: case[k] for k in ("pair", "stage", "variant", "batch_size", "batches", "seconds", "source", "n_train") if k in case}
    for i in range(case["rounds"]):
        for mode in ("1x2", "2x1") if i % 2 == 0 else ("2x1", "1x2"):
            la = load_average()
            if mode == "1x2":
                r = run_case("benchmarks.throughput", {"kind": "loop", **worker, "threads": 2})
                total = r.get("images_per_s")
                per = [total]
            else:
                start = time.time() + 20.0  # both interpreters import and build within this margin
                procs = [_spawn({"kind": "loop", **worker, "threads": 1, "start_at": start}) for _ in range(2)]
                res = [_collect(p) for p in procs]
                per = [r.get("images_per_s") for r in res]
                total = sum(per) if all(per) else None
            rounds.append({"round": i, "mode": mode, "images_per_s_total": total, "per_process": per, "load": la})
    tot = {m: [r["images_per_s_total"] for r in rounds if r["mode"] == m and r["images_per_s_total"]] for m in ("1x2", "2x1")}
    pairs = [(a["images_per_s_total"], b["images_per_s_total"]) for a, b in zip(
        [r for r in rounds if r["mode"] == "2x1"], [r for r in rounds if r["mode"] == "1x2"])]
    ratio = [a / b for a, b in pairs if a and b]
    out = {"rounds": rounds, "images_per_s_total": {m: summarize(v) for m, v in tot.items()},
           "ratio_2x1_over_1x2": summarize(ratio)}
    out["summary"] = f"2x1 / 1x2 = {out['ratio_2x1_over_1x2']['median']:.2f}" if ratio else "no ratio"
    return out


# glibc's malloc: never return freed memory to the OS by trimming the heap, and serve blocks below
# 1 GiB from the heap instead of fresh mmaps, so the large activations of every step reuse pages
# already mapped instead of page-faulting them in again (the values computed do not change).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def env_case(case: dict[str, Any]) -> dict[str, Any]:
    """One stage trained in fresh processes under two environments (``default`` vs ``malloc``: the
    glibc settings of ``MALLOC_ENV``), alternating A, B, B, A, ...; images/s and the per-pair ratio."""
    from .common import run_case

    envs = {"default": {}, "malloc": MALLOC_ENV}
    worker = {k: case[k] for k in ("pair", "stage", "variant", "batch_size", "batches", "seconds", "source", "n_train", "threads") if k in case}
    rounds = []
    for i in range(case["rounds"]):
        for mode in ("default", "malloc") if i % 2 == 0 else ("malloc", "default"):
            la = load_average()
            r = run_case("benchmarks.throughput", {"kind": "loop", **worker}, env=envs[mode])
            rounds.append({"round": i, "mode": mode, "images_per_s": r.get("images_per_s"), "max_rss_mb": r.get("max_rss_mb"),
                           "error": r.get("error"), "load": la})
    by = {m: [r for r in rounds if r["mode"] == m] for m in envs}
    ratio = [b["images_per_s"] / a["images_per_s"] for a, b in zip(by["default"], by["malloc"])
             if a["images_per_s"] and b["images_per_s"]]
    out = {"rounds": rounds, "env": MALLOC_ENV, "ratio_malloc_over_default": summarize(ratio),
           "images_per_s": {m: summarize([r["images_per_s"] for r in v if r["images_per_s"]]) for m, v in by.items()},
           "max_rss_mb": {m: summarize([r["max_rss_mb"] for r in v if r["max_rss_mb"]]) for m, v in by.items()}}
    out["summary"] = f"malloc / default = {out['ratio_malloc_over_default']['median']:.2f}" if ratio else "no ratio"
    return out


def _spawn(case: dict[str, Any]):
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    return subprocess.Popen([sys.executable, "-m", "benchmarks.throughput", "--case", json.dumps(case)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _collect(proc) -> dict[str, Any]:
    from .common import MARKER

    out, err = proc.communicate(timeout=900)
    for line in reversed(out.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    return {"error": f"exit {proc.returncode}: {(err or out).strip().splitlines()[-1:]}"}


def profile_case(case: dict[str, Any]) -> dict[str, Any]:
    """Where a step's time goes: ``torch.profiler`` (CPU) over ``batches`` steps after ``warm``; the top
    operators by self CPU time, as a share of the profiled steps' wall time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    _threads(case)
    data, source = case_data(case)
    bs = case.get("batch_size", 128)
    built = build_stage(case, data)
    try:
        built.run(subset(data.train, case["warm"] * bs))
        split = subset(data.train, case["batches"] * bs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            row = built.run(split)
    finally:
        built.close()
    events = prof.key_averages()
    total_us = row["time_s"] * 1e6
    ops = sorted(((e.key, e.self_cpu_time_total, e.count) for e in events), key=lambda x: -x[1])
    top = [{"op": k, "self_ms_per_step": t / 1e3 / case["batches"], "share": t / total_us, "calls_per_step": c / case["batches"]}
           for k, t, c in ops[: case.get("top", 25)]]
    n_ops = sum(c for _k, _t, c in ops) / case["batches"]
    return {"phase": built.phase, "step_ms": row["time_s"] * 1e3 / case["batches"], "ops_per_step": n_ops,
            "top_ops": top, "data_source": source, "torch_threads": torch.get_num_threads(),
            "summary": f"{row['time_s'] * 1e3 / case['batches']:.1f} ms/step, {n_ops:.0f} ops/step"}


def parts_case(case: dict[str, Any]) -> dict[str, Any]:
    """Where a KD step's time goes, by component: each part timed alone over the same ``batches``
    batches, interleaved over ``repeats`` rounds, next to the whole step through ``Engine.run_epoch``.

    Parts: the batch (gather, crop, flip, normalise), the frozen source's forward (no grad, its taps),
    the student's forward with its taps, the stage's whole loss function (source forward included) +
    backward, the loss alone (forward + backward on detached inputs) and the optimizer (zero_grad, zero-filled grads, step)."""
    import torch

    _threads(case)
    data, source = case_data(case)
    bs = case.get("batch_size", 128)
    built = build_stage(case, data)
    stage, st = built.stage, built.state
    split = subset(data.train, case["batches"] * bs)
    epoch = built.epoch
    try:
        built.run(subset(data.train, case.get("warm", 2) * bs))
        batches = list(split.batches(bs, shuffle=True, seed=0, epoch=epoch))
        from indistill.models import Taps, model_taps

        method = stage.extra
        src = stage.frozen[0] if stage.frozen and getattr(method, "needs_teacher", True) else None
        s_taps = Taps(stage.model, {k: v for k, v in model_taps(stage.model).items() if k in ("embedding", "logits")})
        t_taps = Taps(src, {k: v for k, v in model_taps(src).items() if k in ("embedding", "logits")}) if src is not None else None

        def data_part():
            for _ in split.batches(bs, shuffle=True, seed=0, epoch=epoch):
                pass

        def source_part():
            if t_taps is not None:
                with torch.no_grad():
                    for b in batches:
                        t_taps(b.images)

        def student_fwd():
            for b in batches:
                s_taps(b.images)

        def fwd_loss_bwd():
            for b in batches:
                sum(stage.loss_fn(b, epoch).values()).backward()

        feats = []
        if t_taps is not None and method is not None:
            with torch.no_grad():
                for b in batches:
                    _, s = s_taps(b.images)
                    _, t = t_taps(b.images)
                    feats.append(({k: v.detach().requires_grad_(True) for k, v in s.items()}, t, b))

        def loss_part():
            for s, t, b in feats:
                sum(method(s, t, b, epoch).values()).backward()

        params = [p for g in st.optimizer.param_groups for p in g["params"]]

        def opt_part():
            for _ in batches:
                st.optimizer.zero_grad(set_to_none=True)
                for p in params:  # Adam skips parameters without a gradient: give each a (zero) one
                    p.grad = torch.zeros_like(p)
                st.optimizer.step()

        parts = {"data": data_part, "source_forward": source_part, "student_forward": student_fwd,
                 "loss_fn+backward": fwd_loss_bwd, "loss_fwd+bwd": loss_part, "optimizer": opt_part}
        times: dict[str, list[float]] = {k: [] for k in [*parts, "step"]}
        for _ in range(case["repeats"]):
            for k, f in parts.items():
                t0 = time.perf_counter()
                f()
                times[k].append((time.perf_counter() - t0) / len(batches) * 1e3)
            # the real step last (the optimizer part moved the weights a little: speed does not depend on them)
            times["step"].append(built.run(split)["time_s"] / len(batches) * 1e3)
        s_taps.remove()
        if t_taps is not None:
            t_taps.remove()
    finally:
        built.close()
    med = {k: summarize(v) for k, v in times.items()}
    step = med["step"]["median"]
    share = {k: v["median"] / step for k, v in med.items() if k != "step"}
    return {"phase": built.phase, "ms_per_step": med, "share_of_step": share, "data_source": source,
            "torch_threads": torch.get_num_threads(),
            "summary": f"step {step:.1f} ms: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in share.items())}


class LoaderSplit:
    """A ``Split`` served by a torchvision-style ``DataLoader``: per-sample transforms on the fly.

    Same tensors and augmentation (pad-4 random crop, flip, normalise) as the in-memory path, so
    the difference in images/s is the cost of the per-sample pipeline. Workers persist across
    epochs (as a well-configured training script would), so worker start-up is not timed.
    """

    def __init__(self, images, labels, mean, std, num_workers: int, batch_size: int):
        import torch
        from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset
        from torchvision.transforms import v2

        transform = v2.Compose([
            v2.RandomCrop(images.shape[-1], padding=4), v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)),
        ])
        base = TensorDataset(images, labels)

        class Transformed(Dataset):
            def __len__(self):
                return len(base)

            def __getitem__(self, i):
                x, y = base[i]
                return transform(x), y, i

        self._labels = labels
        self.loader = DataLoader(
            Transformed(), batch_size=batch_size, sampler=RandomSampler(base, generator=torch.Generator().manual_seed(0)),
            num_workers=num_workers, persistent_workers=num_workers > 0,
        )

    @property
    def labels(self):
        return self._labels

    def __len__(self) -> int:
        return len(self._labels)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return len(self.loader)

    def batches(self, batch_size, *, shuffle=False, seed=0, epoch=0, device="cpu", drop_last=False):
        from indistill.data.base import Batch

        for x, y, i in self.loader:
            yield Batch(x.to(device), y.to(device), i.to(device))


def accuracy_case(case: dict[str, Any]) -> dict[str, Any]:
    """Train cnn32_small with cross-entropy (``Engine.fit``) and report test top-1."""
    import torch

    from indistill.config import load_config
    from indistill.data import get_dataset
    from indistill.errors import UserError
    from indistill.pipeline import Pipeline
    from indistill.stages import supervised_stage, top1_evaluator

    v = VARIANTS[case["variant"]]
    try:
        data = get_dataset("fashion_mnist", train_subset=case["train"], test_subset=case["test"])
        source = "fashion_mnist"
    except UserError:
        data = get_dataset("digits")
        source = "digits"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [
            f"out_dir={tmp}", "name=acc", "progress=false", "device=cpu" if not torch.cuda.is_available() else "device=auto",
            f"precision={v['precision']}", f"channels_last={str(v['channels_last']).lower()}", "seed=0",
            f"student.train.epochs={case['epochs']}", f"student.train.eval_every={case['epochs']}",
        ])
        pipe = Pipeline(cfg, data=data)
        model = pipe.seeded_model(cfg.student)
        evaluate = top1_evaluator(model, data, pipe.device, cfg.data.eval_batch_size)
        t0 = time.perf_counter()
        pipe.engine.fit(supervised_stage("acc", model, cfg.student.train, evaluate=evaluate))
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (pipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    top1 = rows[-1].get("test_top1")
    return {
        "test_top1": top1, "final_loss": rows[-1].get("loss"), "train_wall_s": wall, "data_source": source,
        "train_images": len(data.train), "test_images": len(data.test),
        "summary": f"top-1 {top1:.2f}" if top1 is not None else "no top-1",
    }


CASE_KINDS = {"stage": stage_case, "interleaved": interleaved_case, "loop": loop_case, "procs": procs_case,
              "profile": profile_case, "accuracy": accuracy_case, "env": env_case, "parts": parts_case}


def case_fn(case: dict[str, Any]) -> dict[str, Any]:
    return CASE_KINDS[case["kind"]](case)


# -- the parent --------------------------------------------------------------

def cases(quick: bool) -> list[dict[str, Any]]:
    """The case matrix. Full: every stage x variant for both pairs. Quick (fits ~10 min on a loaded
    2-core machine): every cnn stage in fp32, the other variants on KD-PKT (and bf16+channels_last
    on supervised and the MSE warmup), the ResNet pair (~4 s per batch on 2 cores) on supervised,
    both warmup phases and KD-PKT in fp32; fewer batches."""
    out: list[dict[str, Any]] = []
    # (warm-up batches, timed batches per repeat, repeats, stop repeating after this many timed seconds)
    n = {"cnn": (3, 10, 3, 10) if quick else (3, 30, 5, 60), "resnet": (1, 1, 2, 10) if quick else (2, 6, 3, 60)}

    def add(pair, stage, variant, data="memory", threads=None):
        warm, batches, repeats, budget = n[pair]
        out.append({"kind": "stage", "pair": pair, "stage": stage, "variant": variant, "data": data,
                    "batch_size": 128, "warm": warm, "batches": batches, "repeats": repeats, "budget_s": budget,
                    "threads": threads})

    def in_quick(pair: str, stage: str, variant: str) -> bool:
        if pair == "cnn":
            return variant == "fp32" or stage == "kd:pkt" or (variant == "bf16_cl" and stage in ("supervised", "warmup_mse"))
        return variant == "fp32" and stage in ("supervised", "warmup_mse", "warmup_pkt", "kd:pkt")

    # Interleaved stage ratios first: robust to the load changing between cases.
    stages_ratio = ["kd:pkt", "kd:ce", "supervised", "aux_pkt", "warmup_mse", "warmup_pkt"]
    for pair, (warm, batches, repeats) in {"cnn": (2, 10, 5 if quick else 9), "resnet": (1, 1 if quick else 3, 3)}.items():
        for threads in (None, 1) if pair == "cnn" else (None,):
            out.append({"kind": "interleaved", "name": "stages", "pair": pair, "batch_size": 128, "warm": warm,
                        "batches": batches, "repeats": repeats, "threads": threads,
                        "entries": [{"stage": s} for s in (stages_ratio if pair == "cnn" else stages_ratio[:1] + stages_ratio[4:])]})
    # Precision/format speed-ups interleaved in one process (compile is left to the per-case matrix).
    for stage in ("supervised", "kd:pkt"):
        for threads in (None, 1):
            out.append({"kind": "interleaved", "name": "variants", "pair": "cnn", "batch_size": 128, "warm": 2,
                        "batches": 8 if quick else 20, "repeats": 4 if quick else 7, "threads": threads,
                        "entries": [{"stage": stage, "variant": v} for v in ("fp32", "channels_last", "bf16", "bf16_cl")]})
    for pair in PAIRS:
        for stage in STAGES:
            for variant in VARIANTS:
                if not quick or in_quick(pair, stage, variant):
                    add(pair, stage, variant)
    # One intra-op thread: on a shared, oversubscribed CPU OpenMP barriers stall when a thread is descheduled.
    for stage in ("supervised", "kd:pkt") if quick else ("supervised", "warmup_mse", "kd:pkt"):
        add("cnn", stage, "fp32", threads=1)
    for d in ("loader0", "loader2"):
        add("cnn", "supervised", "fp32", d)
        if not quick:
            add("cnn", "kd:pkt", "fp32", d)
    for variant in ("fp32", "bf16_cl"):
        out.append({"kind": "accuracy", "variant": variant, "train": 6000 if quick else 12000, "test": 2000,
                    "epochs": 3 if quick else 5})
    return out


def _label(c: dict[str, Any]) -> str:
    th = f" threads={c['threads']}" if c.get("threads") else ""
    if c["kind"] == "interleaved":
        return f"{c.get('pair', 'cnn')} {c.get('name', '')} interleaved: {', '.join(_entry_key(e) for e in c['entries'])}{th}"
    if c["kind"] == "accuracy":
        return f"accuracy cnn32_small {c['variant']} ({c['train']} imgs x {c['epochs']} ep)"
    if c["kind"] in ("procs", "profile", "loop", "env", "parts"):
        return f"{c['kind']} {c['pair']} {c['stage']}{th}"
    return f"{c['pair']} {c['stage']} {c['variant']} {c['data']}{th}"


def _ips(rows, pair, stage, variant="fp32", data="memory", threads=None) -> float | None:
    for r in rows:
        c = r.get("case", {})
        if (c.get("kind") == "stage" and c.get("pair") == pair and c.get("stage") == stage and c.get("variant") == variant
                and c.get("data") == data and c.get("threads") == threads and "images_per_s" in r):
            return r["images_per_s"]["median"]
    return None


def derived(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios across the separate cases: variant speed-ups, data-path cost, 60k-image epoch time."""
    out: dict[str, Any] = {"speedup_vs_fp32": {}, "data_path": {}, "epoch_60k_s": {}}
    for pair in PAIRS:
        for stage in STAGES:
            base = _ips(rows, pair, stage)
            for variant in VARIANTS:
                vi = _ips(rows, pair, stage, variant)
                if base and vi and variant != "fp32":
                    out["speedup_vs_fp32"].setdefault(pair, {}).setdefault(stage, {})[variant] = vi / base
                if vi:
                    out["epoch_60k_s"].setdefault(pair, {}).setdefault(stage, {})[variant] = FULL_TRAIN / vi
    for stage in ("supervised", "kd:pkt"):
        mem = _ips(rows, "cnn", stage)
        for d in ("loader0", "loader2"):
            li = _ips(rows, "cnn", stage, "fp32", d)
            if mem and li:
                out["data_path"].setdefault(stage, {})[f"memory/{d}"] = mem / li
    for stage in ("supervised", "warmup_mse", "kd:pkt"):
        base, one = _ips(rows, "cnn", stage), _ips(rows, "cnn", stage, threads=1)
        if base and one:
            out.setdefault("one_thread_over_default", {})[stage] = one / base
    out["accuracy_top1"] = {r["case"]["variant"]: r.get("test_top1") for r in rows if r.get("case", {}).get("kind") == "accuracy"}
    return out


def run(quick: bool) -> dict[str, Any]:
    """Every case in its own subprocess; returns ``{"cases": [...], "derived": {...}}``."""
    rows = run_cases("benchmarks.throughput", cases(quick), _label, timeout=900)
    return {"cases": rows, "derived": derived(rows), "goals": {"cnn_kd_epoch_60k_s_max": 5.0}}


def base_ref() -> str:
    """The commit this branch's performance changes are measured against: its merge base with main."""
    out = subprocess.run(["git", "-C", str(ROOT), "merge-base", "HEAD", "main"], capture_output=True, text=True)
    return out.stdout.strip() or "HEAD"


def kd_cases(quick: bool, ref: str | None = None) -> list[dict[str, Any]]:
    """The KD-step study (``throughput_kd.json``): profiles, before/after of the performance changes,
    2 processes x 1 thread vs 1 process x 2 threads, and the allocator setting; Cnn32 (frozen
    source) -> Cnn32-small, batch 128, PKT reference variant."""
    ref = ref or base_ref()
    out: list[dict[str, Any]] = []
    for stage in ("kd:pkt", "kd:ce", "warmup_mse", "supervised"):
        out.append({"kind": "profile", "pair": "cnn", "stage": stage, "warm": 2, "batches": 4 if quick else 10,
                    "threads": 1, "top": 25})
    for stage in ("kd:pkt", "kd:ce", "aux_pkt"):
        out.append({"kind": "parts", "pair": "cnn", "stage": stage, "warm": 2, "batches": 4 if quick else 8,
                    "repeats": 3 if quick else 7, "threads": 1})
    stages = ["kd:pkt", "warmup_mse", "warmup:stage2", "warmup:stage3", "warmup_pkt", "kd:ce", "supervised", "aux_pkt"]
    entries = [{"stage": st, "code": code} for st in stages for code in ("base", "current")]
    for threads in (1, None) if not quick else (1,):
        out.append({"kind": "interleaved", "name": "before/after", "pair": "cnn", "batch_size": 128, "warm": 2,
                    "batches": 4 if quick else 6, "repeats": 3 if quick else 7, "threads": threads, "base_ref": ref,
                    "ref": {"stage": "kd:pkt", "code": "base"}, "entries": entries})
    out.append({"kind": "procs", "pair": "cnn", "stage": "kd:pkt", "batch_size": 128, "batches": 10,
                "seconds": 10 if quick else 25, "rounds": 2 if quick else 4})
    out.append({"kind": "env", "pair": "cnn", "stage": "kd:pkt", "batch_size": 128, "batches": 10, "threads": 1,
                "seconds": 10 if quick else 20, "rounds": 2 if quick else 4})
    return out


def run_kd(quick: bool) -> dict[str, Any]:
    """The KD-step study, every case in its own subprocess."""
    ref = base_ref()
    rows = run_cases("benchmarks.throughput", kd_cases(quick, ref), _label, timeout=1800)
    return {"cases": rows, "base_ref": ref, "study": "kd_step"}


# -- README ----------------------------------------------------------------------

def _mm(v: dict[str, Any] | None, fmt: str = ".2f") -> str:
    if not isinstance(v, dict) or v.get("median") is None:
        return "-"
    return f"{v['median']:{fmt}} ({v['min']:{fmt}}-{v['max']:{fmt}})"


def render_interleaved(rows: list[dict[str, Any]]) -> list[str]:
    """One table per interleaved case: images/s and the per-round time ratio to its reference entry."""
    lines: list[str] = []
    for r in rows:
        c = r.get("case", {})
        title = f"{c.get('pair', 'cnn')} {c.get('name', 'interleaved')}, threads {c.get('threads') or 'default'}"
        lines += [f"{title}: {c.get('repeats')} rounds x {c.get('batches')} batches of {c.get('batch_size', 128)}"
                  + (f"; `@base` = `src/indistill` at `{c['base_ref']}`" if c.get("base_ref") else "")
                  + (f"; load average at start {r['load_at_start']}" if r.get("load_at_start") else ""), ""]
        if "error" in r:
            lines += [f"error: {r['error'][:200]}", ""]
            continue
        ref = r.get("ref")
        body = [[k, r.get("phases", {}).get(k) or "-", _mm(r["images_per_s"].get(k), ".0f"), _mm(r["ratio_to_ref"].get(k))]
                for k in r.get("time_s", {})]
        lines += table(["entry", "phase", "img/s median (min-max)", f"time / time of {ref}"], body) + [""]
    return lines


def render(payload: dict[str, Any]) -> list[str]:
    rows = payload.get("cases", [])
    d = payload.get("derived", {})
    lines = ["Training throughput in images/s (median of repeats; min-max in brackets), batch 128, timed",
             "through the public `Engine.begin` + `Engine.run_epoch(stage, epoch, state, split=...)` over a",
             "fixed number of batches after warm-up batches. `-` = not run in this mode.", ""]
    for pair, (t, s) in PAIRS.items():
        body = []
        for stage in STAGES:
            cells = [stage]
            for variant in VARIANTS:
                r = next((r for r in rows if r.get("case", {}).get("kind") == "stage" and r["case"].get("pair") == pair
                          and r["case"].get("stage") == stage and r["case"].get("variant") == variant
                          and r["case"].get("data") == "memory" and not r["case"].get("threads")), None)
                if r is None:
                    cells.append("-")
                elif "images_per_s" in r:
                    ips = r["images_per_s"]
                    cells.append(f"{ips['median']:.0f} [{ips['min']:.0f}-{ips['max']:.0f}]")
                else:
                    cells.append("error: " + str(r.get("error", "?"))[:80].replace("|", "/"))
            if any(c != "-" for c in cells[1:]):
                body.append(cells)
        if body:
            lines += [f"### {t} -> {s}", ""] + table(["stage", *VARIANTS], body) + [""]
    inter = [r for r in rows if r.get("case", {}).get("kind") == "interleaved"]
    if inter:
        lines += ["### Interleaved in one process (ratios robust to load changes)", "",
                  "Each round times every entry back to back on the same batches; ratio = per-round time over the",
                  "reference entry's time (< 1 is faster).", ""] + render_interleaved(inter)
    e60 = d.get("epoch_60k_s", {}).get("cnn", {})
    if e60:
        lines += ["### cnn32 -> cnn32_small: seconds per 60k-image epoch (extrapolated; goal <= 5 s for KD)", ""]
        lines += table(["stage", *VARIANTS], [[st, *[e60.get(st, {}).get(v) for v in VARIANTS]] for st in STAGES if st in e60]) + [""]
    dp = d.get("data_path", {})
    if dp:
        lines += ["### Data path: in-memory batches vs DataLoader (per-sample transforms), throughput ratio", ""]
        lines += table(["stage", "ratio", "value"], [[s, k, v] for s, per in dp.items() for k, v in per.items()]) + [""]
    one = d.get("one_thread_over_default", {})
    if one:
        lines += ["### cnn32 -> cnn32_small, fp32: 1 intra-op thread vs torch's default, throughput ratio", ""]
        lines += table(["stage", "1 thread / default"], list(one.items())) + [""]
    acc = [r for r in rows if r.get("case", {}).get("kind") == "accuracy"]
    if acc:
        lines += ["### Precision check: cnn32_small cross-entropy, same seed", ""]
        lines += table(["variant", "data", "train imgs", "epochs", "test top-1", "train wall s"],
                       [[r["case"]["variant"], r.get("data_source"), r.get("train_images"), r["case"]["epochs"],
                         r.get("test_top1"), r.get("train_wall_s")] for r in acc])
    return lines


if __name__ == "__main__":
    case_main(case_fn)


def render_kd(payload: dict[str, Any]) -> list[str]:
    """``throughput_kd.json``: the KD-step study."""
    rows = payload.get("cases", [])
    kind = lambda k: [r for r in rows if r.get("case", {}).get("kind") == k]  # noqa: E731
    lines = ["Cnn32 (frozen source) -> Cnn32-small, batch 128, PKT reference variant, Fashion-MNIST-shaped",
             "1x32x32 input; one intra-op thread unless said otherwise (the grid's workers run one each).", ""]
    parts = kind("parts")
    if parts:
        lines += ["#### Where a step's time goes, by component (ms per step, median; share of the whole step)", "",
                  "Each component timed alone on the same batches, interleaved with whole steps through",
                  "`Engine.run_epoch`. `loss_fn+backward` is the stage's loss function (source forward included)",
                  "plus backward; the student's backward is what it leaves after the source, student forward and loss.", ""]
        keys = ["data", "source_forward", "student_forward", "loss_fwd+bwd", "loss_fn+backward", "optimizer"]
        body = []
        for r in parts:
            if "error" in r:
                body.append([r["case"]["stage"], "error: " + r["error"][:80]] + [""] * len(keys))
                continue
            ms = r["ms_per_step"]
            body.append([r["case"]["stage"], f"{ms['step']['median']:.1f}",
                         *[f"{ms[k]['median']:.1f} ({100 * r['share_of_step'][k]:.0f}%)" for k in keys]])
        lines += table(["stage", "step ms", *keys], body)
        lines += [f"load average at start: {', '.join(str(r.get('load_at_start')) for r in parts)}", ""]
    prof = kind("profile")
    if prof:
        lines += ["#### torch.profiler: top operators by self CPU time (share of the profiled steps' wall time)", ""]
        for r in prof:
            if "error" in r:
                lines += [f"{r['case']['stage']}: error {r['error'][:120]}", ""]
                continue
            top = ", ".join(f"{o['op'].replace('aten::', '')} {100 * o['share']:.0f}%" for o in r["top_ops"][:8])
            lines += [f"- `{r['case']['stage']}` ({r.get('phase') or 'supervised'}): {r['step_ms']:.1f} ms/step, "
                      f"{r['ops_per_step']:.0f} profiler events/step; {top} (load at start {r.get('load_at_start')})"]
        lines += [""]
    ab = kind("interleaved")
    if ab:
        lines += ["#### Before / after the performance changes, interleaved in one process", "",
                  "`@base` = the stage built by `src/indistill` at the branch's merge base with main, with that",
                  "version's data pipeline; ratio = per-round time / time of `kd:pkt@base` (< 1 is faster).", ""]
        lines += render_interleaved(ab)
        for r in ab:
            if "error" in r:
                continue
            ips = r["images_per_s"]
            sp = [[k, f"{ips[k + '@base']['median']:.0f}", f"{ips[k]['median']:.0f}", f"{_speedup(r, k):.3f}"]
                  for k in ips if not k.endswith("@base") and k + "@base" in ips]
            lines += [f"Speed-up per stage (threads {r['case'].get('threads') or 'default'}; time(base) / time(current)); "
                      "code paths the changes do not touch (kd:pkt, kd:ce, supervised, aux_pkt) show the noise level:", ""]
            lines += table(["stage", "img/s base", "img/s current", "speed-up"], sp) + [""]
    procs = kind("procs")
    if procs:
        lines += ["#### KD step: 2 processes x 1 thread vs 1 process x 2 threads (total img/s)", ""]
        for r in procs:
            t = r.get("images_per_s_total", {})
            lines += table(["mode", "total img/s median (min-max)", "rounds"],
                           [[m, _mm(t.get(m), ".0f"), (t.get(m) or {}).get("n")] for m in ("2x1", "1x2")])
            lines += ["", f"2x1 / 1x2 = {_mm(r.get('ratio_2x1_over_1x2'))}; load average per round: "
                      + ", ".join(f"{x['mode']} {x['load']}" for x in r.get("rounds", [])), ""]
    env = kind("env")
    if env:
        lines += ["#### glibc malloc settings (same code, same results): KD step, 1 thread, fresh process each", ""]
        for r in env:
            ips, rss = r.get("images_per_s", {}), r.get("max_rss_mb", {})
            lines += table(["environment", "img/s median (min-max)", "peak RSS MiB"],
                           [[m if m == "default" else " ".join(f"{k}={v}" for k, v in r.get("env", {}).items()),
                             _mm(ips.get(m), ".0f"), _mm(rss.get(m), ".0f")] for m in ("default", "malloc")])
            lines += ["", f"malloc / default = {_mm(r.get('ratio_malloc_over_default'))}; load average per run: "
                      + ", ".join(f"{x['mode']} {x['load']}" for x in r.get("rounds", [])), ""]
    return lines


def _speedup(r: dict[str, Any], key: str) -> float:
    """time(base) / time(current) of an interleaved entry: the median of per-round ratios when the
    per-round times are stored, else the ratio of the two entries' median per-round ratios to the reference."""
    rounds = r.get("rounds_time_s")
    if rounds:
        return summarize([b / a for b, a in zip(rounds[key + "@base"], rounds[key])])["median"]
    return r["ratio_to_ref"][key + "@base"]["median"] / r["ratio_to_ref"][key]["median"]
