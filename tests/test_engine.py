import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from indistill.checkpoint import atomic_save, load_weights, safe_load
from indistill.config import OptimizerSpec, SchedulerSpec, TrainSpec
from indistill.engine import Engine, Stage
from indistill.errors import UserError
from indistill.models import create_model


class Interrupt(Exception):
    pass


def _stage(model, epochs, interrupt_at=None):
    calls = {"n": 0}

    def loss_fn(batch, epoch):
        calls["n"] += 1
        if interrupt_at is not None and calls["n"] == interrupt_at:
            raise Interrupt
        return {"ce": F.cross_entropy(model(batch.images), batch.labels)}

    spec = TrainSpec(epochs=epochs, optimizer=OptimizerSpec(name="sgd", lr=0.05, momentum=0.9),
                     scheduler=SchedulerSpec(name="multistep", milestones=[2], gamma=0.5), eval_every=0)
    return Stage("sup", model, loss_fn, spec)


def _model(seed=0):
    torch.manual_seed(seed)
    return create_model("cnn32_small", 10, 1)


def test_interrupted_run_resumes_bit_identical(tmp_path, digits):
    ref = _model()
    Engine(tmp_path / "a", digits.train, batch_size=256, progress=False).fit(_stage(ref, 4))

    m = _model()
    eng = Engine(tmp_path / "b", digits.train, batch_size=256, progress=False)
    per_epoch = digits.train.num_batches(256)
    with pytest.raises(Interrupt):  # dies in the middle of epoch 3
        eng.fit(_stage(m, 4, interrupt_at=2 * per_epoch + 2))
    assert eng._last_path("sup").is_file() and not eng.is_done("sup")
    assert safe_load(eng._last_path("sup"))["epoch"] == 2
    m2 = _model(seed=123)  # a fresh process would rebuild the model; its init must not matter
    eng.fit(_stage(m2, 4))
    for (k, a), b in zip(ref.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["lr"] == pytest.approx(0.025)


def test_finished_stage_is_loaded_not_retrained(tmp_path, digits):
    m = _model()
    eng = Engine(tmp_path, digits.train, batch_size=512, progress=False)
    eng.fit(_stage(m, 1))
    m2 = _model(seed=5)
    eng.fit(_stage(m2, 1, interrupt_at=1))  # would raise if it trained again
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


def test_nan_loss_is_a_user_error(tmp_path, digits):
    m = _model()

    def loss_fn(batch, epoch):
        return {"bad": m(batch.images).sum() * float("nan")}

    with pytest.raises(UserError, match="lower the learning rate"):
        Engine(tmp_path, digits.train, batch_size=512, progress=False).fit(Stage("x", m, loss_fn, TrainSpec(epochs=1)))


def test_corrupt_checkpoint_is_a_user_error(tmp_path):
    p = tmp_path / "c.pt"
    atomic_save({"model": _model().state_dict()}, p)
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(UserError, match="corrupt"):
        load_weights(_model(), p)
    with pytest.raises(UserError, match="not found"):
        load_weights(_model(), tmp_path / "missing.pt")
    good = tmp_path / "g.pt"
    atomic_save({"model": create_model("cnn32", 10, 1).state_dict()}, good)
    with pytest.raises(UserError, match="does not fit"):
        load_weights(_model(), good)


def _train_cmd(out, epochs):
    return [sys.executable, "-m", "indistill", "train", "model.name=cnn32_small", "data.name=digits",
            f"train.epochs={epochs}", "train.eval_every=0", f"out_dir={out}", "name=r", "progress=false",
            "device=cpu", "evaluate.protocols=[standard]"]


def test_killed_cli_run_resumes_to_identical_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    epochs = 12
    subprocess.run(_train_cmd(tmp_path / "full", epochs), check=True, env=env, capture_output=True)
    last = tmp_path / "killed" / "r" / "checkpoints" / "model.last.pt"
    proc = subprocess.Popen(_train_cmd(tmp_path / "killed", epochs), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    final = tmp_path / "killed" / "r" / "checkpoints" / "model.pt"
    assert not final.exists(), "the run finished before it could be killed"
    subprocess.run(_train_cmd(tmp_path / "killed", epochs), check=True, env=env, capture_output=True)
    a = safe_load(tmp_path / "full" / "r" / "checkpoints" / "model.pt")["model"]
    b = safe_load(final)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
