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
augmentation. Engine and bare "epochs" of ``batches`` batches alternate (ABBA order: the engine
first on even rounds, the order reversed on odd ones) for many rounds in one process with one
intra-op thread, so a change in the machine's load hits both alike; the result is the median
ms/step of each and the median of the per-round ratios engine / bare (goal: within 5%, i.e.
<= 1.05), in wall time and in process CPU time (which a process waiting for the CPU does not
accrue: the steadier ratio when other work shares the machine).

The KD case has two bare loops: ``bare`` runs the frozen teacher's forward before the student's,
as one writes it by hand; ``bare_stage_order`` runs the student's first, as the arm's loss
function does. Their difference is the cost of that order on CPU, not of the engine's machinery
(likely the allocator: the student's saved activations are live during the teacher's forward; in
one probe, raising glibc's ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` removed the gap).

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
``results/engine_overhead_before.json`` (``--label after`` once the redesign lands). With
``ENGINE_OVERHEAD_REF=<git ref>`` in the environment the cases import ``src/indistill`` as of that
commit (as ``indistill_base``, :func:`benchmarks.throughput.import_base`) instead of the working
tree: the "before" side stays measurable after the redesign is committed. The result records which
code ran (``code``: the ref's commit, or HEAD and whether ``src/`` had uncommitted changes).
"""

from __future__ import annotations

import atexit
import copy
import importlib
import os
import random
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from .common import ROOT, case_main, load_average, run_cases, summarize, table

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


# The bare loops of each stage: name -> the order of the two forwards (None: one network).
# ``bare`` is the loop one writes by hand (the frozen teacher first, then the student);
# ``bare_stage_order`` runs the student first, as the arm's loss function does (arm_stage).
BARE = {"supervised": {"bare": None}, "kd:pkt": {"bare": "teacher_first", "bare_stage_order": "student_first"}}


def bare_loss(stage_name: str, model, teacher, order: str | None = "teacher_first", pkg: str = "indistill"):
    """The bare loop's loss of one batch: the same maths the stage's loss function does, written out."""
    import torch
    import torch.nn.functional as F

    if stage_name == "supervised":
        def loss(batch):
            return F.cross_entropy(model(batch.images), batch.labels)
    elif stage_name == "kd:pkt":
        pkt_loss = importlib.import_module(f"{pkg}.methods").pkt_loss

        def teacher_emb(x):
            with torch.no_grad():
                return _cnn_forward(teacher, x)[1]

        if order == "student_first":
            def loss(batch):
                s = _cnn_forward(model, batch.images)[1]
                return pkt_loss(s, teacher_emb(batch.images), variant="reference")
        else:
            def loss(batch):
                t = teacher_emb(batch.images)
                return pkt_loss(_cnn_forward(model, batch.images)[1], t, variant="reference")
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


class BareLoop:
    """One hand-written loop: its own copy of the stage's models (hooks removed), a new optimizer of the
    engine's class and settings, and the loss written out."""

    def __init__(self, stage_name: str, stage, engine_opt, batches: list[Any], order: str | None, pkg: str = "indistill"):
        self.model = _bare_copy(stage.model)
        teacher = _bare_copy(stage.frozen[0]) if stage.frozen else None
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self.opt = type(engine_opt)(self.model.parameters(), **engine_opt.defaults)
        self.loss = bare_loss(stage_name, self.model, teacher, order, pkg)
        self.batches = batches

    def epoch(self) -> None:
        model, opt, loss_fn = self.model, self.opt, self.loss
        model.train()
        for batch in self.batches:
            loss = loss_fn(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()


def overhead_case(case: dict[str, Any]) -> dict[str, Any]:
    """Build ``case["stage"]`` for the engine and its bare loops, then time them interleaved."""
    import torch

    from . import throughput

    torch.set_num_threads(int(case.get("threads") or 1))
    torch.manual_seed(0)
    bs, nb = int(case.get("batch_size", 128)), int(case["batches"])
    pkg = "indistill"
    if case.get("ref"):
        pkg = throughput.import_base(case["ref"])  # a copy of src/indistill in a temp dir: removed at exit
        atexit.register(shutil.rmtree, Path(importlib.import_module(pkg).__file__).parent.parent, ignore_errors=True)
    data, source = throughput.load_data("random", n_train=bs * nb, test_subset=case.get("test_subset", 32), pkg=pkg)
    built = throughput.build_stage({"pair": "cnn", "variant": "fp32", "batch_size": bs, **case}, data, pkg=pkg)
    try:
        stage, state, engine = built.stage, built.state, built.engine
        if hasattr(engine, "loss_guard"):
            engine.loss_guard = float(case.get("loss_guard", 1e4))  # the config default: the guard's comparison runs
        device = getattr(engine, "device", torch.device("cpu"))
        split = FixedBatches(list(data.train.batches(bs, shuffle=True, seed=0, epoch=0, device=device)))
        batches = list(split.batches(bs))
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        bare = {name: BareLoop(case["stage"], stage, state.optimizer, batches, order, pkg)
                for name, order in BARE[case["stage"]].items()}
        eng_inner_s: list[float] = []
        losses: list[float] = []

        def engine_epoch() -> None:
            row = built.run(split)
            eng_inner_s.append(float(row["time_s"]))
            losses.append(float(row["loss"]))

        runs: dict[str, Any] = {"engine": engine_epoch, **{k: b.epoch for k, b in bare.items()}}
        for _ in range(int(case.get("warm_rounds", 2))):
            for fn in runs.values():
                fn()
        del eng_inner_s[:], losses[:]
        times: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[float]] = {k: [] for k in runs}  # process CPU time: what descheduling does not inflate
        loads: list[Any] = []
        budget = case.get("budget_s")
        t_start = time.perf_counter()
        for r in range(int(case["rounds"])):
            if r % 10 == 0:
                loads.append(load_average())
            for who in (list(runs) if r % 2 == 0 else list(runs)[::-1]):  # ABBA: neither goes first every time
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                runs[who]()
                sync()  # CUDA: the bare loop never waits for the GPU by itself
                times[who].append(time.perf_counter() - t0)
                cpu[who].append(time.process_time() - c0)
            if budget is not None and time.perf_counter() - t_start > budget and r + 1 >= int(case.get("min_rounds", 2)):
                break  # a loaded machine gets fewer rounds rather than a run that never ends
        diffs = {k: max(float((a.detach() - c.detach()).abs().max()) for a, c in
                        zip(stage.model.parameters(), b.model.parameters())) for k, b in bare.items()}
    finally:
        built.close()
    ms = lambda xs: [1000.0 * x / nb for x in xs]  # noqa: E731  epoch seconds -> ms per step
    eng_s = times["engine"]
    variants: dict[str, Any] = {}
    for k in bare:
        ratios = [e / b for e, b in zip(eng_s, times[k])]
        variants[k] = {
            "order": BARE[case["stage"]][k], "ms_per_step": summarize(ms(times[k])), "ratio": summarize(ratios),
            "ratio_p25_p75": [_quantile(ratios, 0.25), _quantile(ratios, 0.75)], "ratio_median_ci95": list(_median_ci(ratios)),
            "ratio_of_medians": statistics.median(eng_s) / statistics.median(times[k]) if ratios else None,
            "ratio_inner": summarize([e / b for e, b in zip(eng_inner_s, times[k])]),
            "cpu_ms_per_step": summarize(ms(cpu[k])),
            "ratio_cpu": summarize([e / b for e, b in zip(cpu["engine"], cpu[k]) if b > 0]),
            "ratio_cpu_median_ci95": list(_median_ci([e / b for e, b in zip(cpu["engine"], cpu[k]) if b > 0])),
            "max_param_diff_vs_engine": diffs[k],
        }
    main = variants["bare"]
    eopt = state.optimizer
    out: dict[str, Any] = {
        "stage": case["stage"], "package": pkg, "phase": built.phase, "rounds": len(eng_s), "batches_per_round": nb, "batch_size": bs,
        "engine_ms_per_step": summarize(ms(eng_s)), "engine_inner_ms_per_step": summarize(ms(eng_inner_s)),
        "engine_cpu_ms_per_step": summarize(ms(cpu["engine"])),
        "bare_ms_per_step": main["ms_per_step"], "ratio": main["ratio"], "ratio_median_ci95": main["ratio_median_ci95"],
        "ratio_inner": main["ratio_inner"], "max_param_diff_engine_vs_bare": max(diffs.values()), "bare": variants,
        "engine_loss_last": losses[-1] if losses else None,
        "optimizer": type(eopt).__name__, "optimizer_settings": {k: list(v) if isinstance(v, tuple) else v for k, v in eopt.defaults.items()
                                                                 if isinstance(v, (int, float, str, bool, tuple, type(None)))},
        "loss_guard": getattr(engine, "loss_guard", None), "data_source": source, "torch_threads": torch.get_num_threads(),
        "load_every_10_rounds": loads, "rounds_s": times, "rounds_cpu_s": cpu,
        "cpu_share": sum(map(sum, cpu.values())) / max(1e-9, sum(map(sum, times.values()))),
    }
    med = main["ratio"]["median"]
    out["summary"] = (f"engine {out['engine_ms_per_step']['median']:.1f} ms/step, "
                      + ", ".join(f"{k} {v['ms_per_step']['median']:.1f} ms/step (ratio {v['ratio']['median']:.3f},"
                                  f" CPU-time ratio {v['ratio_cpu']['median']:.3f})" for k, v in variants.items())
                      + f" over {len(eng_s)} rounds") if med is not None else "no rounds"
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

def cases(quick: bool, ref: str | None = None) -> list[dict[str, Any]]:
    """One case per stage, each in its own subprocess; ``budget_s`` caps a case's timed rounds (the full
    run fits ~6 minutes on a loaded 2-core machine). ``ref``: a commit whose ``src/indistill`` runs."""
    rounds, batches, budget = (20, 4, 25) if quick else (400, 6, 120)
    return [{"kind": "overhead", "stage": s, "batch_size": 128, "batches": batches, "rounds": rounds,
             "warm_rounds": 2, "budget_s": budget, "threads": 1, **({"ref": ref} if ref else {})} for s in STAGES]


def _git(*args: str) -> str:
    out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    return out.stdout.rstrip() if out.returncode == 0 else ""


def code_state(ref: str | None) -> dict[str, Any]:
    """Which ``indistill`` the cases ran: a commit's ``src/indistill``, or the working tree (HEAD + its changes)."""
    if ref:
        commit = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
        if not commit:
            raise SystemExit(f"ENGINE_OVERHEAD_REF={ref!r} is not a commit of {ROOT}")
        return {"source": "commit", "ref": ref, "commit": commit, "subject": _git("log", "-1", "--format=%s", commit)[:120]}
    changed = [line[3:] for line in _git("status", "--porcelain", "--", "src").splitlines()]
    return {"source": "working tree", "commit": _git("rev-parse", "HEAD"), "src_dirty": bool(changed),
            "src_changed": changed[:40]}


def _label(c: dict[str, Any]) -> str:
    at = f" @ {c['ref'][:12]}" if c.get("ref") else ""
    return f"engine{at} vs bare loop: {c['stage']} ({c['batches']} batches of {c['batch_size']} per round, threads {c['threads']})"


def run(quick: bool) -> dict[str, Any]:
    """Every case in its own subprocess; ``ENGINE_OVERHEAD_REF`` (if set) names the commit whose code runs."""
    ref = os.environ.get("ENGINE_OVERHEAD_REF") or None
    code = code_state(ref)
    rows = run_cases("benchmarks.engine_overhead", cases(quick, code.get("commit") if ref else None), _label, timeout=900)
    return {"cases": rows, "goal_ratio_max": GOAL, "code": code}


# -- README ----------------------------------------------------------------------

def render(payload: dict[str, Any]) -> list[str]:
    rows = payload.get("cases", [])
    label = payload.get("label")
    lines = [("" if not label else f"Label `{label}` (issue 20: the same benchmark before and after the redesign). ")
             + "One training step through `Engine.begin` + `Engine.run_epoch` vs a bare PyTorch loop of the same step",
             "(same initial weights, batches already in memory, loss maths, optimizer class and settings), interleaved",
             "in one process (ABBA, one intra-op thread); ratio = per-round engine time / bare time, median over rounds",
             f"(goal <= {payload.get('goal_ratio_max', GOAL)}), with a 95% bootstrap interval of that median. Engine time is"
             " the whole `run_epoch` call; `inner` = the engine's own `time_s` over the same bare time. `CPU` = the same ratio",
             "of process CPU time, which a descheduled process does not accrue: the steadier number when other work",
             "shares the CPU (`CPU share` = CPU time / wall time of the timed rounds).",
             "`bare` runs the frozen teacher's forward before the student's,",
             "as one writes it by hand; `bare_stage_order` the student's first, as the arm's loss function does.",
             "`max param diff` = largest weight difference between the engine's model and the bare copy after",
             "the run (0: both took the very same steps).", ""]
    code = payload.get("code") or {}
    if code.get("source") == "commit":
        lines += [f"Code: `src/indistill` at `{code.get('commit', '?')[:12]}` ({code.get('subject', '')}), imported as"
                  f" `indistill_base` (`ENGINE_OVERHEAD_REF={code.get('ref')}`).", ""]
    elif code:
        lines += [f"Code: the working tree at `{code.get('commit', '?')[:12]}`"
                  + (f", `src/` with uncommitted changes ({len(code.get('src_changed') or [])} files)" if code.get("src_dirty")
                     else ", `src/` clean") + ".", ""]
    body = []
    for r in rows:
        c = r.get("case", {})
        if "error" in r:
            body.append([c.get("stage"), "-", "-", "-", "error: " + str(r["error"])[:80].replace("|", "/")] + ["-"] * 7)
            continue
        variants = r.get("bare") or {"bare": {"ms_per_step": r["bare_ms_per_step"], "ratio": r["ratio"],
                                               "ratio_median_ci95": r.get("ratio_median_ci95"),
                                               "ratio_inner": r.get("ratio_inner", {}),
                                               "max_param_diff_vs_engine": r.get("max_param_diff_engine_vs_bare")}}
        for name, v in variants.items():
            body.append([
                f"{c.get('stage')} ({r.get('phase') or 'ce'})", name, r["engine_ms_per_step"]["median"],
                v["ms_per_step"]["median"], _ci(v["ratio"], v.get("ratio_median_ci95")),
                _ci(v.get("ratio_cpu"), v.get("ratio_cpu_median_ci95")), _f((v.get("ratio_inner") or {}).get("median")),
                f"{r.get('rounds')} x {r.get('batches_per_round')} x {r.get('batch_size')}",
                _f(r.get("cpu_share")), v.get("max_param_diff_vs_engine"), r.get("load_at_start"),
            ])
    lines += table(["stage", "bare loop", "engine ms/step", "bare ms/step", "ratio engine/bare [95% CI]",
                    "CPU-time ratio [95% CI]", "inner ratio", "rounds x batches x batch", "CPU share", "max param diff",
                    "load at start"], body)
    return lines


def _ci(summary: dict[str, Any] | None, ci: list[Any] | None) -> str:
    if not summary or summary.get("median") is None:
        return "-"
    lo, hi = (ci or [None, None])[:2]
    return _f(summary["median"]) + (f" [{_f(lo)}-{_f(hi)}]" if lo is not None else "")


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    case_main(case_fn)
