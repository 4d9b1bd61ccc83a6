"""Training throughput (images/s) of every stage, through the real Pipeline and Engine code.

A case builds its stage exactly as ``indistill run`` does: a :class:`~indistill.pipeline.Pipeline`
whose ``engine.fit`` is replaced by a timing harness, so ``pipeline.supervised``, ``.warmup``
and ``.kd`` construct the real ``Stage`` (loss closures, pruned teacher, method modules) and
the harness runs the Engine's own ``_epoch`` loop over a fixed number of batches instead of a
whole epoch. Data: Fashion-MNIST (60k x 1x32x32, random crop + flip) when installed, else random
uint8 images of that shape; the models are randomly initialised (speed does not depend on the
weights). CRD sees the full 60k-sample memory bank even though only a few batches are timed.
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any

from .common import case_main, run_cases, summarize, table

PAIRS = {"cnn": ("cnn32", "cnn32_small"), "resnet": ("resnet56", "resnet20")}
STAGES = ["ce", "warmup_mse", "warmup_pkt", "kd:kd", "kd:pkt", "kd:crd", "kd:dkd"]
VARIANTS = {
    "fp32": {"precision": "fp32", "channels_last": False, "compile": False},
    "channels_last": {"precision": "fp32", "channels_last": True, "compile": False},
    "bf16": {"precision": "bf16", "channels_last": False, "compile": False},
    "bf16_cl": {"precision": "bf16", "channels_last": True, "compile": False},
    "compile": {"precision": "fp32", "channels_last": False, "compile": True},
}
FULL_TRAIN = 60000


# -- inside the case subprocess --------------------------------------------------

def load_data(test_subset: int | None = None):
    """Fashion-MNIST when installed, else random uint8 data of the same shape (and a note saying so)."""
    import torch

    from indistill.data import get_dataset
    from indistill.data.memory import make_in_memory_splits
    from indistill.errors import UserError

    try:
        return get_dataset("fashion_mnist", test_subset=test_subset), "fashion_mnist"
    except UserError:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (FULL_TRAIN, 1, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (FULL_TRAIN,), generator=g)
        xt = torch.randint(0, 256, (test_subset or 10000, 1, 32, 32), dtype=torch.uint8, generator=g)
        yt = torch.randint(0, 10, (test_subset or 10000,), generator=g)
        return make_in_memory_splits("random", 10, x, y, xt, yt, pad=4, flip=True), "random_uint8"


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


def _subset(split, n: int):
    from indistill.data.memory import InMemorySplit

    return InMemorySplit(split.images[:n], split.labels[:n], split.mean, split.std, pad=split.pad, flip=split.flip)


def _target_of(m):
    """What to compile for a frozen module: the teacher inside a PrunedTeacher (whose forward adds hooks)."""
    from torch import nn

    inner = getattr(m, "teacher", None)
    return inner if isinstance(inner, nn.Module) else m


def _measure(engine, stage, case: dict[str, Any], data) -> dict[str, Any]:
    """The Engine's preparation and ``_epoch`` loop, timed over ``repeats`` x ``batches`` batches."""
    import torch

    from indistill.engine import build_optimizer

    params = engine.prepare_stage(stage)
    want = case["stage"]
    epoch = 0
    if stage.phase is not None:
        phases = [stage.phase(e) for e in range(stage.train.epochs)]
        key = "pkt" if want == "warmup_pkt" else "mse"
        epoch = next(e for e, p in enumerate(phases) if key in p.split(":")[-1])
    opt = build_optimizer(params, stage.optimizer or stage.train.optimizer)
    scaler = torch.amp.GradScaler(engine.device.type, enabled=engine.precision == "fp16")
    out: dict[str, Any] = {"epoch_measured": epoch, "phase": stage.phase(epoch) if stage.phase else None}
    if case.get("compile"):
        stage.model.compile()
        for m in stage.frozen:
            _target_of(m).compile()
    bs = case["batch_size"]
    if case.get("data", "memory") == "memory":
        warm_split, meas_split = _subset(data.train, case["warm"] * bs), _subset(data.train, case["batches"] * bs)
    else:
        nw = int(case["data"].removeprefix("loader"))
        tr = data.train
        loader = LoaderSplit(tr.images[: case["batches"] * bs], tr.labels[: case["batches"] * bs], tr.mean, tr.std, nw, bs)
        warm_split, meas_split = loader, loader
    engine.train_split = warm_split
    t0 = time.perf_counter()
    try:
        engine._epoch(stage, epoch, opt, scaler)
    except Exception as e:  # torch.compile failures are results, not crashes
        if case.get("compile"):
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
        raise
    out["warmup_s"] = time.perf_counter() - t0
    ips, times = [], []
    budget = case.get("budget_s")
    for _ in range(case["repeats"]):
        row = engine._epoch(stage, epoch, opt, scaler)
        ips.append(row["images_per_s"])
        times.append(row["time_s"])
        if budget is not None and sum(times) > budget:
            break  # a loaded machine gets fewer repeats rather than a run that never ends
    out["images_per_s"] = summarize(ips)
    out["time_s"] = summarize(times)
    out["images_timed"] = len(meas_split)
    if case.get("compile"):
        from torch._dynamo.utils import counters

        out["graph_breaks"] = int(sum(counters["graph_break"].values()))
        out["unique_graphs"] = int(counters["stats"].get("unique_graphs", 0))
    return out


def stage_case(case: dict[str, Any]) -> dict[str, Any]:
    """One (pair, stage, variant, data path) measurement."""
    import torch

    from indistill.config import ArmSpec, TrainSpec, load_config
    from indistill.pipeline import Pipeline

    if case.get("threads"):
        torch.set_num_threads(int(case["threads"]))
    torch.manual_seed(0)
    data, source = load_data(test_subset=512)
    teacher_name, student_name = PAIRS[case["pair"]]
    v = VARIANTS[case["variant"]]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [
            f"out_dir={tmp}", "name=bench", "progress=false", "device=cpu" if not torch.cuda.is_available() else "device=auto",
            f"precision={v['precision']}", f"channels_last={str(v['channels_last']).lower()}",
            f"data.batch_size={case['batch_size']}", f"teacher.name={teacher_name}", f"student.name={student_name}",
        ])
        pipe = Pipeline(cfg, data=data)
        teacher = pipe.build_model(cfg.teacher)
        student = pipe.build_model(cfg.student)
        result: dict[str, Any] = {}

        def fit(stage):
            result.update(_measure(pipe.engine, stage, case | v, data))
            return {}

        pipe.engine.fit = fit  # the harness replaces the whole-epoch loop; everything before it is the pipeline's
        stage = case["stage"]
        if stage == "ce":
            pipe.supervised("ce", student, TrainSpec(epochs=1, eval_every=0))
        elif stage.startswith("warmup"):
            pipe.warmup(ArmSpec(name="arm"), teacher, student)
        else:
            pipe.kd(ArmSpec(name="arm", method=stage.split(":", 1)[1]), teacher, student, epochs=1)
    result.update({"data_source": source, "torch_threads": torch.get_num_threads()})
    if "images_per_s" in result:
        result["summary"] = f"{result['images_per_s']['median']:.0f} img/s"
    return result


def ratio_case(case: dict[str, Any]) -> dict[str, Any]:
    """Warmup vs KD epoch time, interleaved in one process so both see the same machine load.

    The pipeline's ``fit`` is re-entered: fitting the warmup stage builds the KD stage (on copies
    of the teacher and student), whose ``fit`` then times both in alternation while both stages'
    taps are alive. Rounds: warmup-MSE, warmup-PKT, KD; the ratio is taken within each round.
    """
    import copy

    import torch

    from indistill.config import ArmSpec, load_config
    from indistill.engine import build_optimizer
    from indistill.pipeline import Pipeline

    if case.get("threads"):
        torch.set_num_threads(int(case["threads"]))
    torch.manual_seed(0)
    data, source = load_data(test_subset=512)
    teacher_name, student_name = PAIRS[case["pair"]]
    bs, method = case["batch_size"], case.get("method", "pkt")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"out_dir={tmp}", "name=bench", "progress=false", f"data.batch_size={bs}",
                                 f"teacher.name={teacher_name}", f"student.name={student_name}"])
        pipe = Pipeline(cfg, data=data)
        teacher, student = pipe.build_model(cfg.teacher), pipe.build_model(cfg.student)
        teacher2, student2 = copy.deepcopy(teacher), copy.deepcopy(student)
        engine = pipe.engine
        stages: dict[str, Any] = {}
        result: dict[str, Any] = {}

        def timed_rounds() -> None:
            runs = {}
            for key, (stage, epoch) in stages.items():
                params = engine.prepare_stage(stage)
                runs[key] = (stage, epoch, build_optimizer(params, stage.optimizer or stage.train.optimizer))
            scaler = torch.amp.GradScaler(engine.device.type, enabled=False)
            warm, meas = _subset(data.train, case["warm"] * bs), _subset(data.train, case["batches"] * bs)
            engine.train_split = warm
            for stage, epoch, opt in runs.values():
                engine._epoch(stage, epoch, opt, scaler)
            engine.train_split = meas
            times: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(case["repeats"]):
                for key, (stage, epoch, opt) in runs.items():
                    times[key].append(engine._epoch(stage, epoch, opt, scaler)["time_s"])
            kd = times[f"kd:{method}"]
            for key in ("warmup_mse", "warmup_pkt"):
                result[f"{key}/kd:{method}"] = summarize([w / k for w, k in zip(times[key], kd)])
            result["time_s"] = {k: summarize(v) for k, v in times.items()}

        def fit(stage):
            if stage.phase is not None:  # the warmup stage: register both of its phases, then build KD
                phases = [stage.phase(e) for e in range(stage.train.epochs)]
                stages["warmup_mse"] = (stage, phases.index(next(p for p in phases if p.endswith(":mse"))))
                stages["warmup_pkt"] = (stage, phases.index(next(p for p in phases if p.endswith(":pkt"))))
                pipe.kd(ArmSpec(name="kd", method=method), teacher2, student2, epochs=1)
            else:
                stages[f"kd:{method}"] = (stage, 0)
                timed_rounds()
            return {}

        engine.fit = fit
        pipe.warmup(ArmSpec(name="arm"), teacher, student)
    key = f"warmup_mse/kd:{method}"
    result.update({"data_source": source, "torch_threads": torch.get_num_threads(),
                   "summary": f"{key} {result[key]['median']:.3f}" if key in result else "no ratio"})
    return result


def variants_case(case: dict[str, Any]) -> dict[str, Any]:
    """One stage under several precision/format variants, interleaved in one process.

    One Pipeline (and Engine) per variant; each pipeline's ``fit`` builds the next variant's stage
    before returning, so all stages (and their taps) are alive when the last one times them in
    rounds. Speed-ups are per-round ratios to fp32, so the machine load cancels out.
    """
    import torch

    from indistill.config import ArmSpec, TrainSpec, load_config
    from indistill.engine import build_optimizer
    from indistill.pipeline import Pipeline

    if case.get("threads"):
        torch.set_num_threads(int(case["threads"]))
    data, source = load_data(test_subset=512)
    teacher_name, student_name = PAIRS[case["pair"]]
    names, bs, stage_name = case["variants"], case["batch_size"], case["stage"]
    built: list[tuple[Any, Any]] = []
    result: dict[str, Any] = {}
    tmp = tempfile.TemporaryDirectory()

    def timed_rounds() -> None:
        runs = []
        for engine, stage in built:
            params = engine.prepare_stage(stage)
            opt = build_optimizer(params, stage.optimizer or stage.train.optimizer)
            runs.append((engine, stage, opt, torch.amp.GradScaler(engine.device.type, enabled=False)))
        warm, meas = _subset(data.train, case["warm"] * bs), _subset(data.train, case["batches"] * bs)
        for engine, stage, opt, sc in runs:
            engine.train_split = warm
            engine._epoch(stage, 0, opt, sc)
            engine.train_split = meas
        times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(case["repeats"]):
            for n, (engine, stage, opt, sc) in zip(names, runs):
                times[n].append(engine._epoch(stage, 0, opt, sc)["time_s"])
        result["time_s"] = {n: summarize(v) for n, v in times.items()}
        result["speedup_vs_fp32"] = {n: summarize([f / t for f, t in zip(times["fp32"], times[n])]) for n in names}

    def build(i: int) -> None:
        if i == len(names):
            timed_rounds()
            return
        v = VARIANTS[names[i]]
        cfg = load_config(None, [
            f"out_dir={tmp.name}", f"name=v{i}", "progress=false", f"precision={v['precision']}",
            f"channels_last={str(v['channels_last']).lower()}", f"data.batch_size={bs}",
            f"teacher.name={teacher_name}", f"student.name={student_name}",
        ])
        pipe = Pipeline(cfg, data=data)
        torch.manual_seed(0)
        teacher, student = pipe.build_model(cfg.teacher), pipe.build_model(cfg.student)

        def fit(stage):
            built.append((pipe.engine, stage))
            build(i + 1)
            return {}

        pipe.engine.fit = fit
        if stage_name == "ce":
            pipe.supervised("ce", student, TrainSpec(epochs=1, eval_every=0))
        else:
            pipe.kd(ArmSpec(name="arm", method=stage_name.split(":", 1)[1]), teacher, student, epochs=1)

    try:
        build(0)
    finally:
        tmp.cleanup()
    sp = result.get("speedup_vs_fp32", {})
    result.update({"data_source": source, "torch_threads": torch.get_num_threads(),
                   "summary": " ".join(f"{n} x{v['median']:.2f}" for n, v in sp.items() if n != "fp32")})
    return result


def accuracy_case(case: dict[str, Any]) -> dict[str, Any]:
    """Train cnn32_small with cross-entropy (real Engine.fit) and report test top-1."""
    import json

    import torch

    from indistill.config import TrainSpec, load_config
    from indistill.data import get_dataset
    from indistill.errors import UserError
    from indistill.pipeline import Pipeline

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
        ])
        pipe = Pipeline(cfg, data=data)
        torch.manual_seed(0)
        model = pipe.build_model(cfg.student)
        t0 = time.perf_counter()
        pipe.supervised("acc", model, TrainSpec(epochs=case["epochs"], eval_every=case["epochs"]))
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (pipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    top1 = rows[-1].get("test_top1")
    return {
        "test_top1": top1, "final_loss": rows[-1].get("loss"), "train_wall_s": wall, "data_source": source,
        "train_images": len(data.train), "test_images": len(data.test),
        "summary": f"top-1 {top1:.2f}" if top1 is not None else "no top-1",
    }


def case_fn(case: dict[str, Any]) -> dict[str, Any]:
    return {"accuracy": accuracy_case, "ratio": ratio_case, "variants": variants_case}.get(case["kind"], stage_case)(case)


# -- the parent --------------------------------------------------------------

def cases(quick: bool) -> list[dict[str, Any]]:
    """The case matrix. Full: every stage x variant for both pairs. Quick (fits ~10 min on a loaded
    2-core machine): every cnn stage in fp32, the other variants on KD-PKT (and bf16+channels_last
    on CE and the MSE warmup), the ResNet pair (~4 s per batch on 2 cores) on CE, both warmup
    phases and KD-PKT in fp32 plus KD-PKT in bf16+channels_last; fewer batches."""
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
            return variant == "fp32" or stage == "kd:pkt" or (variant == "bf16_cl" and stage in ("ce", "warmup_mse"))
        if variant == "fp32":
            return stage in ("ce", "warmup_mse", "warmup_pkt", "kd:pkt")
        return variant == "bf16_cl" and stage == "kd:pkt"

    # Interleaved warmup/KD ratios first: the goal number, robust to the load changing between cases.
    for pair, (warm, batches, repeats) in {"cnn": (2, 10, 5 if quick else 9), "resnet": (1, 1 if quick else 3, 3)}.items():
        for threads in (None, 1) if pair == "cnn" else (None,):
            out.append({"kind": "ratio", "pair": pair, "method": "pkt", "batch_size": 128, "warm": warm,
                        "batches": batches, "repeats": repeats, "threads": threads})
    # Precision/format speed-ups interleaved in one process (compile is left to the per-case matrix).
    for stage in ("ce", "kd:pkt"):
        for threads in (None, 1):
            out.append({"kind": "variants", "pair": "cnn", "stage": stage, "batch_size": 128, "warm": 2,
                        "batches": 8 if quick else 20, "repeats": 4 if quick else 7, "threads": threads,
                        "variants": ["fp32", "channels_last", "bf16", "bf16_cl"]})
    out.append({"kind": "variants", "pair": "resnet", "stage": "kd:pkt", "batch_size": 128, "warm": 1,
                "batches": 1 if quick else 3, "repeats": 2 if quick else 3, "threads": None,
                "variants": ["fp32", "channels_last", "bf16_cl"]})
    for pair in PAIRS:
        for stage in STAGES:
            for variant in VARIANTS:
                if not quick or in_quick(pair, stage, variant):
                    add(pair, stage, variant)
    # One intra-op thread: on a shared, oversubscribed CPU OpenMP barriers stall when a thread is descheduled.
    for stage in ("ce", "kd:pkt") if quick else ("ce", "warmup_mse", "kd:pkt"):
        add("cnn", stage, "fp32", threads=1)
    for d in ("loader0", "loader2"):
        add("cnn", "ce", "fp32", d)
        if not quick:
            add("cnn", "kd:pkt", "fp32", d)
    for variant in ("fp32", "bf16_cl"):
        out.append({"kind": "accuracy", "variant": variant, "train": 6000 if quick else 12000, "test": 2000,
                    "epochs": 3 if quick else 5})
    return out


def _label(c: dict[str, Any]) -> str:
    if c["kind"] == "variants":
        return f"{c['pair']} {c['stage']} variants interleaved" + (f" threads={c['threads']}" if c.get("threads") else "")
    if c["kind"] == "ratio":
        return f"{c['pair']} warmup/kd:{c['method']} interleaved" + (f" threads={c['threads']}" if c.get("threads") else "")
    if c["kind"] == "accuracy":
        return f"accuracy cnn32_small {c['variant']} ({c['train']} imgs x {c['epochs']} ep)"
    return f"{c['pair']} {c['stage']} {c['variant']} {c['data']}" + (f" threads={c['threads']}" if c.get("threads") else "")


def _ips(rows, pair, stage, variant="fp32", data="memory", threads=None) -> float | None:
    for r in rows:
        c = r.get("case", {})
        if (c.get("kind") == "stage" and c.get("pair") == pair and c.get("stage") == stage and c.get("variant") == variant
                and c.get("data") == data and c.get("threads") == threads and "images_per_s" in r):
            return r["images_per_s"]["median"]
    return None


def derived(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios from the same run: warmup/KD epoch time, variant speed-ups, data-path cost, 60k epoch time."""
    out: dict[str, Any] = {"warmup_over_kd": {}, "speedup_vs_fp32": {}, "data_path": {}, "epoch_60k_s": {}}
    for pair in PAIRS:
        for variant in VARIANTS:
            kd = {m: _ips(rows, pair, f"kd:{m}", variant) for m in ("kd", "pkt", "crd", "dkd")}
            for w in ("warmup_mse", "warmup_pkt"):
                wi = _ips(rows, pair, w, variant)
                for m, ki in kd.items():
                    if wi and ki:
                        # epoch time ratio = inverse throughput ratio
                        out["warmup_over_kd"].setdefault(pair, {}).setdefault(variant, {})[f"{w}/kd:{m}"] = ki / wi
        for stage in STAGES:
            base = _ips(rows, pair, stage)
            for variant in VARIANTS:
                vi = _ips(rows, pair, stage, variant)
                if base and vi and variant != "fp32":
                    out["speedup_vs_fp32"].setdefault(pair, {}).setdefault(stage, {})[variant] = vi / base
            for variant in VARIANTS:
                vi = _ips(rows, pair, stage, variant)
                if vi:
                    out["epoch_60k_s"].setdefault(pair, {}).setdefault(stage, {})[variant] = FULL_TRAIN / vi
    for stage in ("ce", "kd:pkt"):
        mem = _ips(rows, "cnn", stage)
        for d in ("loader0", "loader2"):
            li = _ips(rows, "cnn", stage, "fp32", d)
            if mem and li:
                out["data_path"].setdefault(stage, {})[f"memory/{d}"] = mem / li
    for stage in ("ce", "warmup_mse", "kd:pkt"):
        base, one = _ips(rows, "cnn", stage), _ips(rows, "cnn", stage, threads=1)
        if base and one:
            out.setdefault("one_thread_over_default", {})[stage] = one / base
    for r in rows:
        c = r.get("case", {})
        if c.get("kind") == "ratio":
            key = f"{c['pair']}" + (f"_threads{c['threads']}" if c.get("threads") else "")
            out.setdefault("warmup_over_kd_interleaved", {})[key] = {
                k: v["median"] for k, v in r.items() if "/" in k and isinstance(v, dict)}
    acc = {r["case"]["variant"]: r.get("test_top1") for r in rows if r.get("case", {}).get("kind") == "accuracy"}
    out["accuracy_top1"] = acc
    return out


def run(quick: bool) -> dict[str, Any]:
    """Every case in its own subprocess; returns ``{"cases": [...], "derived": {...}}``."""
    rows = run_cases("benchmarks.throughput", cases(quick), _label, timeout=900)
    return {"cases": rows, "derived": derived(rows), "goals": {"warmup_over_kd_max": 1.10, "cnn_kd_epoch_60k_s_max": 5.0}}


def render(payload: dict[str, Any]) -> list[str]:
    rows = payload.get("cases", [])
    d = payload.get("derived", {})
    lines = ["Training throughput in images/s (median of repeats; min-max in brackets), batch 128,",
             "timed through `Engine._epoch` after warm-up batches. `-` = not run in this mode.", ""]
    for pair, (t, s) in PAIRS.items():
        lines += [f"### {t} -> {s}", ""]
        body = []
        for stage in STAGES:
            cells = [stage]
            for variant in VARIANTS:
                r = next((r for r in rows if r.get("case", {}).get("pair") == pair and r["case"].get("stage") == stage
                          and r["case"].get("variant") == variant and r["case"].get("data") == "memory"
                          and not r["case"].get("threads")), None)
                if r is None:
                    cells.append("-")
                elif "images_per_s" in r:
                    ips = r["images_per_s"]
                    cells.append(f"{ips['median']:.0f} [{ips['min']:.0f}-{ips['max']:.0f}]")
                else:
                    cells.append("error: " + str(r.get("error", "?"))[:80].replace("|", "/"))
            body.append(cells)
        lines += table(["stage", *VARIANTS], body) + [""]
    ratio_rows = [r for r in rows if r.get("case", {}).get("kind") == "ratio"]
    if ratio_rows:
        lines += ["### Warmup / KD-PKT epoch-time ratio, interleaved in one process (goal <= 1.10)", "",
                  "Median of per-round ratios (min-max); each round times warmup-MSE, warmup-PKT and KD-PKT",
                  "back to back on the same batches, so a load change between cases does not bias it.", ""]
        body = []
        for r in ratio_rows:
            c = r["case"]
            for k, v in r.items():
                if "/" in k and isinstance(v, dict):
                    body.append([c["pair"], c.get("threads") or "default", k,
                                 f"{v['median']:.3f} ({v['min']:.2f}-{v['max']:.2f})", v["n"], c["batches"]])
            if "error" in r:
                body.append([c["pair"], c.get("threads") or "default", "error", r["error"][:100], "", ""])
        lines += table(["pair", "threads", "ratio", "median (min-max)", "rounds", "batches/round"], body) + [""]
    var_rows = [r for r in rows if r.get("case", {}).get("kind") == "variants"]
    if var_rows:
        lines += ["### Precision/format speed-up over fp32 eager, interleaved in one process", "",
                  "Median (min-max) of per-round fp32-time / variant-time; > 1 is faster.", ""]
        body = []
        for r in var_rows:
            c = r["case"]
            sp = r.get("speedup_vs_fp32", {})
            body.append([c["pair"], c["stage"], c.get("threads") or "default",
                         *[f"{sp[v]['median']:.2f} ({sp[v]['min']:.2f}-{sp[v]['max']:.2f})" if v in sp else
                           ("error" if "error" in r else "-") for v in ("channels_last", "bf16", "bf16_cl")]])
        lines += table(["pair", "stage", "threads", "channels_last", "bf16", "bf16_cl"], body) + [""]
    wk = d.get("warmup_over_kd", {})
    if wk:
        lines += ["### Warmup / KD epoch-time ratio across separate cases (load may differ between them)", ""]
        body = []
        for pair, per in wk.items():
            for variant, ratios in per.items():
                for k, v in ratios.items():
                    body.append([pair, variant, k, v])
        lines += table(["pair", "variant", "ratio", "value"], body) + [""]
    e60 = d.get("epoch_60k_s", {}).get("cnn", {})
    if e60:
        lines += ["### cnn32 -> cnn32_small: seconds per 60k-image epoch (extrapolated; goal <= 5 s for KD)", ""]
        lines += table(["stage", *VARIANTS], [[st, *[e60.get(st, {}).get(v) for v in VARIANTS]] for st in STAGES]) + [""]
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
