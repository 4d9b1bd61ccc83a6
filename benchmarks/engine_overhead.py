"""Engine overhead: one training step through :class:`indistill.engine.Engine` vs a bare PyTorch loop.

Issue 20, item 6: the redesign must cost nothing at run time. Each case builds a stage with the
public builders (:func:`benchmarks.throughput.build_stage`, as ``indistill run`` builds it) and
drives it through the engine's real per-step path, ``engine.begin(stage)`` +
``engine.run_epoch(stage, epoch, state, split=...)`` (the stage's loss dict, the ``Taps`` hooks,
the finite-loss check and loss guard, the grad scaler, the per-term metric sums, tqdm). Beside it a
hand-written loop does the same step on a copy of the same models (same initial weights, the
hooks removed), with the same optimizer class and settings and the same loss maths::

    loss = <loss of the batch>; opt.zero_grad(); loss.backward(); opt.step()

Both read the same batches, materialised once as tensors (``FixedBatches``), so neither pays for
augmentation. Engine and bare "epochs" of ``batches`` batches alternate (ABBA order: engine
first on even rounds, bare first on odd ones) for many rounds in one process with one intra-op
thread, so a change in the machine's load hits both alike; the result is the median ms/step of
each and the median of the per-round ratios engine / bare (goal: within 5%, i.e. <= 1.05).

Cases:

- ``supervised``: cross-entropy on ``cnn32_small`` (1x32x32 inputs, batch 128);
- ``kd:pkt``: an InDistill arm's KD step (no warmup), PKT reference variant, ``cnn32`` frozen
  teacher -> ``cnn32_small`` (the bare loop runs both networks' forward by hand to get the
  classifier's input, the embedding, and calls :func:`indistill.methods.pkt_loss`).

The engine's epoch time is measured around the whole ``run_epoch`` call (so its per-epoch set-up,
amortised over ``batches`` steps, counts against it); the engine's own ``time_s`` is kept too.
After the last round both copies have taken the same steps on the same batches: the largest
parameter difference between them is reported as a check that the two loops do the same work.

``python -m benchmarks --only engine_overhead --label before`` writes
``results/engine_overhead_before.json`` (``--label after`` once the redesign lands).
"""

from __future__ import annotations

import copy
import random
import statistics
import time
from typing import Any

from .common import case_main, load_average, run_cases, summarize, table

STAGES = ("supervised", "kd:pkt")
GOAL = 1.05


class FixedBatches:
    """A training split that yields the same pre-built ``Batch`` tensors every epoch (no augmentation,
    no shuffling, no copies): the engine and the bare loop read identical data already in memory."""

    shardable = False

    def __init__(self, batches: list[Any]):
        self._batches = list(batches)
        import torch

        self._labels = torch.cat([b.labels for b in self._batches]).cpu()

    @property
    def labels(self):
        return self._labels

    def __len__(self) -> int:
        return int(self._labels.numel())

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return len(self._batches)

    def batches(self, batch_size: int, **_kw: Any):
        if any(b.labels.shape[0] != batch_size for b in self._batches):
            raise ValueError("FixedBatches holds batches of another size than the engine asks for")
        return iter(self._batches)


def _bare_copy(module):
    """A deep copy of ``module`` with every forward (pre-)hook removed: what a plain loop would train."""
    m = copy.deepcopy(module)
    for sub in m.modules():
        sub._forward_hooks.clear()
        sub._forward_pre_hooks.clear()
    return m


def _cnn_forward(m, x):
    """Cnn32 / Cnn32-small by hand: (logits, embedding = the classifier's input)."""
    h = m.flatten(m.block3(m.block2(m.block1(x))))
    h = m.relu1(m.fc1(h))
    if getattr(m, "hidden", 1) == 2:
        h = m.relu2(m.fc2(h))
    return m.classifier(h), h


def bare_loss(stage_name: str, model, teacher):
    """The bare loop's loss of one batch, the same maths the stage's loss function does."""
    import torch
    import torch.nn.functional as F

    if stage_name == "supervised":
        def loss(batch):
            return F.cross_entropy(model(batch.images), batch.labels)
    elif stage_name == "kd:pkt":
        from indistill.methods import pkt_loss

        def loss(batch):
            with torch.no_grad():
                _, t = _cnn_forward(teacher, batch.images)
            _, s = _cnn_forward(model, batch.images)
            return pkt_loss(s, t, variant="reference")
    else:
        raise ValueError(f"unknown stage {stage_name!r}; one of {STAGES}")
    return loss


def _median_ci(values: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float | None, float | None]:
    """A 95% bootstrap interval of the median (fixed seed, so a re-render does not change it)."""
    if len(values) < 3:
        return None, None
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n_boot))
    return meds[int(0.025 * n_boot)], meds[int(0.975 * n_boot) - 1]


def overhead_case(case: dict[str, Any]) -> dict[str, Any]:
    """Build ``case["stage"]`` for the engine and its bare copy, then time them interleaved."""
    import torch

    from . import throughput

    torch.set_num_threads(int(case.get("threads") or 1))
    torch.manual_seed(0)
    bs, nb = int(case.get("batch_size", 128)), int(case["batches"])
    data, source = throughput.load_data("random", n_train=bs * nb, test_subset=case.get("test_subset", 32))
    built = throughput.build_stage({"pair": "cnn", "variant": "fp32", "batch_size": bs, **case}, data)
    try:
        stage, state, engine = built.stage, built.state, built.engine
        if hasattr(engine, "loss_guard"):
            engine.loss_guard = float(case.get("loss_guard", 1e4))  # the config default: the guard's comparison runs
        device = getattr(engine, "device", torch.device("cpu"))
        split = FixedBatches(list(data.train.batches(bs, shuffle=True, seed=0, epoch=0, device=device)))
        model = _bare_copy(stage.model)
        teacher = _bare_copy(stage.frozen[0]) if stage.frozen else None
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        eopt = state.optimizer
        opt = type(eopt)(model.parameters(), **eopt.defaults)
        loss_fn = bare_loss(case["stage"], model, teacher)
        batches = list(split.batches(bs))

        def bare_epoch() -> None:
            model.train()
            for batch in batches:
                loss = loss_fn(batch)
                opt.zero_grad()
                loss.backward()
                opt.step()

        def engine_epoch() -> dict[str, Any]:
            return built.run(split)

        for _ in range(int(case.get("warm_rounds", 2))):
            engine_epoch()
            bare_epoch()
        eng_s: list[float] = []
        eng_inner_s: list[float] = []
        bare_s: list[float] = []
        loads: list[Any] = []
        losses: list[float] = []
        budget = case.get("budget_s")
        t_start = time.perf_counter()
        for r in range(int(case["rounds"])):
            if r % 10 == 0:
                loads.append(load_average())
            order = ("engine", "bare") if r % 2 == 0 else ("bare", "engine")
            for who in order:
                t0 = time.perf_counter()
                if who == "engine":
                    row = engine_epoch()
                    eng_s.append(time.perf_counter() - t0)
                    eng_inner_s.append(float(row["time_s"]))
                    losses.append(float(row["loss"]))
                else:
                    bare_epoch()
                    bare_s.append(time.perf_counter() - t0)
            if budget is not None and time.perf_counter() - t_start > budget and r + 1 >= int(case.get("min_rounds", 2)):
                break  # a loaded machine gets fewer rounds rather than a run that never ends
        diff = max(float((a.detach() - b.detach()).abs().max()) for a, b in
                   zip(stage.model.parameters(), model.parameters()))
    finally:
        built.close()
    ms = lambda xs: [1000.0 * x / nb for x in xs]  # noqa: E731  epoch seconds -> ms per step
    ratios = [e / b for e, b in zip(eng_s, bare_s)]
    lo, hi = _median_ci(ratios)
    out: dict[str, Any] = {
        "stage": case["stage"], "phase": built.phase, "rounds": len(ratios), "batches_per_round": nb,
        "batch_size": bs, "engine_ms_per_step": summarize(ms(eng_s)), "engine_inner_ms_per_step": summarize(ms(eng_inner_s)),
        "bare_ms_per_step": summarize(ms(bare_s)), "ratio": summarize(ratios),
        "ratio_p25_p75": [_quantile(ratios, 0.25), _quantile(ratios, 0.75)], "ratio_median_ci95": [lo, hi],
        "ratio_of_medians": statistics.median(eng_s) / statistics.median(bare_s) if ratios else None,
        "ratio_inner": summarize([e / b for e, b in zip(eng_inner_s, bare_s)]),
        "engine_loss_last": losses[-1] if losses else None, "max_param_diff_engine_vs_bare": diff,
        "optimizer": type(eopt).__name__, "optimizer_settings": {k: list(v) if isinstance(v, tuple) else v for k, v in eopt.defaults.items()
                                                                 if isinstance(v, (int, float, str, bool, tuple, type(None)))},
        "loss_guard": getattr(engine, "loss_guard", None), "data_source": source, "torch_threads": torch.get_num_threads(),
        "load_every_10_rounds": loads, "rounds_s": {"engine": eng_s, "bare": bare_s},
    }
    med = out["ratio"]["median"]
    out["summary"] = (f"engine {out['engine_ms_per_step']['median']:.1f} ms/step, bare {out['bare_ms_per_step']['median']:.1f}"
                      f" ms/step, ratio {med:.3f} over {len(ratios)} rounds") if med is not None else "no rounds"
    return out


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    i = q * (len(v) - 1)
    lo = int(i)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (i - lo)


def case_fn(case: dict[str, Any]) -> dict[str, Any]:
    return overhead_case(case)


# -- the parent --------------------------------------------------------------

def cases(quick: bool) -> list[dict[str, Any]]:
    """One case per stage, each in its own subprocess; ``budget_s`` caps a case's timed rounds (the full
    run fits ~6 minutes on a loaded 2-core machine)."""
    rounds, batches, budget = (20, 4, 25) if quick else (400, 6, 120)
    return [{"kind": "overhead", "stage": s, "batch_size": 128, "batches": batches, "rounds": rounds,
             "warm_rounds": 2, "budget_s": budget, "threads": 1} for s in STAGES]


def _label(c: dict[str, Any]) -> str:
    return f"engine vs bare loop: {c['stage']} ({c['batches']} batches of {c['batch_size']} per round, threads {c['threads']})"


def run(quick: bool) -> dict[str, Any]:
    """Every case in its own subprocess."""
    rows = run_cases("benchmarks.engine_overhead", cases(quick), _label, timeout=900)
    return {"cases": rows, "goal_ratio_max": GOAL}


# -- README ----------------------------------------------------------------------

def render(payload: dict[str, Any]) -> list[str]:
    rows = payload.get("cases", [])
    label = payload.get("label")
    lines = [("" if not label else f"Label `{label}` (issue 20: the same benchmark before and after the redesign). ")
             + "One training step through `Engine.begin` + `Engine.run_epoch` vs a bare PyTorch loop of the same step",
             "(same initial weights, batches already in memory, loss maths, optimizer class and settings), interleaved",
             "in one process (ABBA, one intra-op thread); ratio = per-round engine time / bare time, median over rounds",
             f"(goal <= {payload.get('goal_ratio_max', GOAL)}). Engine time is the whole `run_epoch` call; "
             "`inner` = the engine's own `time_s`.", ""]
    body = []
    for r in rows:
        c = r.get("case", {})
        if "error" in r:
            body.append([c.get("stage"), "-", "-", "error: " + str(r["error"])[:80].replace("|", "/"), "-", "-", "-", "-", "-"])
            continue
        ci = r.get("ratio_median_ci95") or [None, None]
        body.append([
            f"{c.get('stage')} ({r.get('phase') or 'ce'})", r["engine_ms_per_step"]["median"], r["bare_ms_per_step"]["median"],
            _f(r["ratio"]["median"]), f"{_f(ci[0])}-{_f(ci[1])}", _f(r.get("ratio_inner", {}).get("median")),
            f"{r.get('rounds')} x {r.get('batches_per_round')} x {r.get('batch_size')}", r.get("max_param_diff_engine_vs_bare"),
            r.get("load_at_start"),
        ])
    lines += table(["stage", "engine ms/step", "bare ms/step", "ratio engine/bare (median)", "95% CI of median",
                    "inner ratio", "rounds x batches x batch", "max param diff", "load at start"], body)
    return lines


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    case_main(case_fn)
