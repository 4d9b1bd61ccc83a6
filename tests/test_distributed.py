"""Data-parallel runs (torchrun semantics) on CPU: gloo, 2 processes.

The 2-process reference run is a real ``python -m torch.distributed.run ... -m indistill run``;
the killed and resumed runs fork the test process with the environment torchrun would set (RANK,
WORLD_SIZE, ...), which spares two interpreter start-ups on a 2-core machine and goes through the
same code (``init_from_env`` reads only those variables).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from indistill.cli import main
from indistill.data.memory import InMemorySplit

from .user_models import make_nobn_net

ROOT = Path(__file__).resolve().parents[1]

# Equality of a 2-process run and a 1-process run with the same global batch (a no-BN model): the
# gradients of the two half-batch means are averaged instead of taking one mean, so float sums run
# in another order. Measured (Adam, 2 + 4 epochs): max |difference| 1.1e-6 over every weight, CRD
# head and memory bank (6e-6 of the tensor's largest entry); CRD's Z (~1e4) differs by 1.6e-6 relative.
# assert_close passes when |a - b| <= ATOL + RTOL |b|: ~10-30x room. A CRD bank updated with each
# rank's own rows only (not the gathered batch) moved the bank by 0.7.
ATOL, RTOL = 1e-5, 1e-4

CONFIG = """
seed: 0
device: cpu
precision: fp32  # the equivalence under test is data-parallel vs one process, at full precision
progress: false
data: {name: digits, batch_size: 32, eval_batch_size: 64, train_subset: 203, test_subset: 60}
teacher:
  name: tests.user_models:make_nobn_net
  kwargs: {width: 8}
  taps: {stage1: '0', stage2: '1', embedding: '4:in', logits: '@output'}
  train: {epochs: 2, optimizer: {name: adam, lr: 0.01}}
student:
  name: tests.user_models:make_nobn_net
  kwargs: {width: 4}
  taps: {stage1: '0', stage2: '1', embedding: '4:in', logits: '@output'}
  train: {epochs: 4, optimizer: {name: adam, lr: 0.01}}
# reference: described (Adam reset only where the loss changes). Under the default (authors: a new Adam every
# epoch) the kd arm's weights differed beyond the tolerance below: a fresh Adam's first step is ~lr * g/|g| per
# element, so float-order differences between one and two processes in a near-zero gradient move whole steps.
# The resets themselves happen at the same epochs on every rank (tests/test_fidelity.py checks the epochs).
warmup: {phase_epochs: [1, 1], reference: described}
arms:
  - {name: kd, warmup: none, method: kd}
  - {name: indistill_crd, warmup: indistill, method: crd, params: {feat_dim: 16}}
evaluate: {protocols: [standard], metrics: [cosine], ks: [1, 10]}
"""
# 203 samples in batches of 32: six full batches and one of 11 (5 + 6 rows: unequal shards, weighted).
STEPS = 7
STAGES = ("teacher", "kd", "indistill_crd")
# Training forwards per process before the kill: teacher 2 epochs, kd 4, indistill_crd 3, then the
# 4th step of indistill_crd's 4th epoch (its second CRD epoch, with a bank and Z to resume).
DIE_AT = STEPS * (2 + 4 + 3) + 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(port: int, world: int) -> dict[str, str]:
    return {"WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def _forked_rank(rank: int, env: dict[str, str], argv: list[str]) -> None:
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # as torchrun's OMP_NUM_THREADS=1
    os._exit(main(argv))


def run_forked(argv: list[str], world: int = 2, extra_env: dict[str, str] | None = None,
               timeout: float = 120) -> list[int | None]:
    """Run ``indistill ARGV`` on ``world`` forked ranks; their exit codes."""
    ctx = multiprocessing.get_context("fork")
    env = {**_env(_free_port(), world), **(extra_env or {})}
    procs = [ctx.Process(target=_forked_rank, args=(r, env, argv)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():  # a rank left waiting at a collective: do not hang the suite
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def _checkpoint(run: Path, stage: str) -> dict:
    return torch.load(run / "checkpoints" / f"{stage}.pt", weights_only=True)


def _tensors(ck: dict) -> dict[str, torch.Tensor]:
    return {**{f"model.{k}": v for k, v in ck["model"].items()},
            **{f"extra.{k}": v for k, v in ck.get("extra", {}).items()}}


def _failure_excerpt(log: str, lines: int = 80) -> str:
    """What a failed torchrun printed that says why: its tail (torchrun's summary, which names only
    the signal), then its error lines (a rank's traceback, a gloo abort's ``what():``) last, where
    a CI log's tail keeps them."""
    keys = ("Error", "error", "Traceback", "terminate", "what()", "Exception", "File \"", "abort")
    hits = [ln for ln in log.splitlines() if any(k in ln for k in keys)]
    return log[-1500:] + "\n... error lines:\n" + "\n".join(hits[-lines:])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same config in one process and (torchrun) in two; both run directories."""
    out = tmp_path_factory.mktemp("ddp")
    cfg = out / "cfg.yaml"
    cfg.write_text(CONFIG)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    two = subprocess.Popen(
        # --max-restarts 1: gloo can abort a rank outside our code (a CI run once lost rank 1 to SIGABRT, with
        # only torchrun's summary left to read); torchrun then restarts the ranks and the run resumes from its
        # checkpoints, bit-identically (the killed-run test below), as the README advises users to launch.
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
         "-m", "indistill", "run", str(cfg), f"out_dir={out}", "name=two"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:  # the single-process run meanwhile, in this process
        assert main(["run", str(cfg), f"out_dir={out}", "name=one"]) == 0
        log, _ = two.communicate(timeout=300)
    finally:
        if two.poll() is None:
            two.kill()
    assert two.returncode == 0, _failure_excerpt(log)
    if "failed (exitcode:" in log:  # torchrun's line for a failed rank: rc 0 after it = restarted
        warnings.warn("the 2-process run needed a torchrun restart:\n" + _failure_excerpt(log), stacklevel=1)
    return {"cfg": cfg, "out": out, "one": out / "one", "two": out / "two", "log": log}


def test_two_processes_equal_one_process_with_the_same_global_batch(runs):
    log = (runs["two"] / "log.txt").read_text()
    assert "data-parallel over 2 processes: global batch 32, 16-16 per process" in log
    assert (runs["two"] / "results.md").is_file() and (runs["two"] / "export" / "kd.safetensors").is_file()
    assert runs["log"].count("# Results: two") == 1  # rank 0 alone prints the report
    for stage in STAGES:
        one, two = _tensors(_checkpoint(runs["one"], stage)), _tensors(_checkpoint(runs["two"], stage))
        assert one.keys() == two.keys()
        for k in one:
            torch.testing.assert_close(two[k], one[k], atol=ATOL, rtol=RTOL, msg=f"{stage} {k}")
    # The CRD banks were written (not left at their random init) and training moved the weights far
    # beyond the tolerance, so the equality above is not that of two untouched models.
    crd = _checkpoint(runs["two"], "indistill_crd")["extra"]
    assert int((crd["sample_labels"] >= 0).sum()) == 203
    torch.manual_seed(0)
    init = make_nobn_net(10, 1, width=4).state_dict()
    moved = max((_checkpoint(runs["two"], "kd")["model"][k] - v).abs().max().item() for k, v in init.items())
    assert moved > 1000 * ATOL


def test_killed_two_process_run_resumes_and_equals_the_uninterrupted_one(runs):
    argv = ["run", str(runs["cfg"]), f"out_dir={runs['out']}", "name=killed"]
    assert run_forked(argv, extra_env={"INDISTILL_TEST_DIE_AT": str(DIE_AT)}) == [3, 3]
    killed = runs["out"] / "killed"
    last = torch.load(killed / "checkpoints" / "indistill_crd.last.pt", weights_only=True)
    assert last["epoch"] == 3 and len(last["rng_ranks"]) == 2
    assert not (killed / "checkpoints" / "indistill_crd.pt").exists()

    assert run_forked(argv) == [0, 0]
    log = (killed / "log.txt").read_text()
    assert "[kd] already finished" in log and "[indistill_crd] resuming after epoch 3/4" in log
    for stage in STAGES:  # bit-identical: same ops in the same order, on both ranks
        ref, got = _tensors(_checkpoint(runs["two"], stage)), _tensors(_checkpoint(killed, stage))
        for k in ref:
            assert torch.equal(got[k], ref[k]), f"{stage} {k}"


def test_torchrun_restarts_a_crashed_rank_and_the_run_resumes_bit_identically(runs):
    """Rank 1 aborts once (SIGABRT) in indistill_crd's 4th epoch; ``torchrun --max-restarts 1`` restarts both
    ranks, which resume from the epoch checkpoint and end where the uninterrupted 2-process run ends."""
    out = runs["out"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "INDISTILL_TEST_ABORT_AT": str(DIE_AT), "INDISTILL_TEST_ABORT_ONCE": str(out / "aborted-once")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
         "-m", "indistill", "run", str(runs["cfg"]), f"out_dir={out}", "name=restarted"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )
    assert proc.returncode == 0, _failure_excerpt(proc.stdout)
    assert (out / "aborted-once").exists() and "failed (exitcode: -6)" in proc.stdout
    log = (out / "restarted" / "log.txt").read_text()
    assert "[kd] already finished" in log and "[indistill_crd] resuming after epoch 3/4" in log
    for stage in STAGES:
        ref, got = _tensors(_checkpoint(runs["two"], stage)), _tensors(_checkpoint(out / "restarted", stage))
        for k in ref:
            assert torch.equal(got[k], ref[k]), f"{stage} {k}"


def test_a_loss_that_breaks_on_one_rank_stops_every_rank(tmp_path, capfd):
    """Rank 1's third teacher batch is NaN: both ranks stop at that step with the one-line error (exit 2),
    where a rank stopping alone would leave the other in the next gradient all-reduce until killed."""
    argv = ["run", str(tmp_path / "cfg.yaml"), f"out_dir={tmp_path}", "name=nan"]
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    codes = run_forked(argv, extra_env={"INDISTILL_TEST_NAN_AT": "3", "INDISTILL_TEST_NAN_RANK": "1"}, timeout=60)
    assert codes == [2, 2]
    err = capfd.readouterr().err
    assert "loss is not finite on another rank at epoch 1" in err or "loss is nan at epoch 1" in err
    assert "Traceback" not in err


def test_rank_slices_of_a_split_make_up_its_global_batches():
    g = torch.Generator().manual_seed(0)
    split = InMemorySplit(torch.randint(0, 255, (11, 1, 6, 6), dtype=torch.uint8, generator=g), torch.arange(11) % 3,
                          (0.5,), (0.25,), pad=1, flip=True)
    whole = list(split.batches(4, shuffle=True, seed=3, epoch=1))
    parts = [list(split.batches(4, shuffle=True, seed=3, epoch=1, rank=r, world=3)) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3]
    for i, batch in enumerate(whole):
        for field in range(3):
            assert torch.equal(torch.cat([p[i][field] for p in parts]), batch[field])
    assert [p[2].labels.numel() for p in parts] == [1, 1, 1]  # the last batch of 3: a row each


def test_imagefolder_rank_slices(tmp_path):
    root = _tiny_imagefolder(tmp_path, per_class=3)
    from indistill.data import get_dataset

    data = get_dataset("imagefolder", root=str(root), image_size=16, num_workers=0)
    whole = list(data.train.batches(4, shuffle=True, seed=1, epoch=2))
    parts = [list(data.train.batches(4, shuffle=True, seed=1, epoch=2, rank=r, world=3)) for r in range(3)]
    for i, batch in enumerate(whole):  # same samples, same augmentation (seeded per sample)
        assert torch.equal(torch.cat([p[i].index for p in parts if p[i].index.numel()]), batch.index)
        assert torch.equal(torch.cat([p[i].images for p in parts if p[i].index.numel()]), batch.images)
    assert [p[-1].index.numel() for p in parts] == [0, 1, 1]  # 6 samples: batches of 4 and 2


def _collectives(rank: int, env: dict[str, str], out: str) -> None:
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from indistill import distributed as ddp
    from indistill.evaluate import extract_features

    assert ddp.init_from_env("cpu")
    x = torch.arange(3 * (rank + 1), dtype=torch.float32).view(-1, 3) + 100 * rank
    gathered = ddp.all_gather_cat(x)
    torch.manual_seed(0)
    model = make_nobn_net(3, 1, width=4)
    g = torch.Generator().manual_seed(1)
    split = InMemorySplit(torch.randint(0, 255, (13, 1, 8, 8), dtype=torch.uint8, generator=g), torch.arange(13) % 3,
                          (0.5,), (0.25,))
    feats = extract_features(model, {"embedding": "4:in", "logits": "@output"}, split, batch_size=2)
    torch.save({"gathered": gathered, "offset": ddp.rows_before(x.shape[0]), "feats": feats}, f"{out}/{rank}.pt")
    # SyncBatchNorm in place: same objects (hooks kept), undone after; refused on CPU by the engine.
    from indistill.engine import Engine, Stage
    from indistill.config import TrainSpec
    from indistill.errors import UserError
    from indistill.models import Taps
    from .user_models import make_net

    bn_net = make_net(3, 1, width=4).eval()
    bn = bn_net[0][1]
    with Taps(bn_net, {"bn": "0.1"}) as taps:
        swapped = ddp.swap_sync_bn(bn_net)
        assert type(bn) is torch.nn.SyncBatchNorm and bn_net[0][1] is bn and len(swapped) == 2
        assert "bn" in taps(torch.zeros(2, 1, 8, 8))[1]  # eval mode: SyncBatchNorm has no CPU kernel to train
        ddp.restore_bn(swapped)
        assert type(bn) is torch.nn.BatchNorm2d
    engine = Engine(out, split, batch_size=4, sync_bn=True, progress=False)
    try:
        engine.begin(Stage("s", bn_net, lambda b, e: {}, TrainSpec(epochs=1)))
        raise AssertionError("sync_bn on CPU was accepted")
    except UserError as e:
        assert "sync_bn needs CUDA" in str(e)
    os._exit(0)


def test_collectives_sharded_extraction_and_sync_bn(tmp_path):
    ctx = multiprocessing.get_context("fork")
    env = _env(_free_port(), 2)
    procs = [ctx.Process(target=_collectives, args=(r, env, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    from indistill.evaluate import extract_features

    torch.manual_seed(0)
    model = make_nobn_net(3, 1, width=4)
    g = torch.Generator().manual_seed(1)
    split = InMemorySplit(torch.randint(0, 255, (13, 1, 8, 8), dtype=torch.uint8, generator=g), torch.arange(13) % 3,
                          (0.5,), (0.25,))
    ref = extract_features(model, {"embedding": "4:in", "logits": "@output"}, split, batch_size=4)
    for r in range(2):
        got = torch.load(tmp_path / f"{r}.pt", weights_only=True)
        assert torch.equal(got["gathered"], torch.tensor([[0.0, 1, 2], [100, 101, 102], [103, 104, 105]]))
        assert got["offset"] == [0, 1][r]
        assert torch.equal(got["feats"]["labels"], ref["labels"])  # split order restored
        for k in ("embedding", "logits"):
            torch.testing.assert_close(got["feats"][k], ref[k], atol=1e-6, rtol=1e-6)


def _tiny_imagefolder(root: Path, per_class: int = 1) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 1)):
        for c in ("n01440764", "n01443537"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / split / c / f"{i}.JPEG")
    return root


IMAGENET_CONFIG = ROOT / "configs" / "imagenet_resnet34_resnet18.yaml"


def test_imagenet_config_loads():
    from indistill.config import load_config, resolve_arms

    cfg = load_config(IMAGENET_CONFIG, ["data.root=/nowhere"])
    assert (cfg.teacher.name, cfg.student.name, cfg.data.name, cfg.precision) == ("resnet34", "resnet18", "imagenet", "auto")
    assert cfg.channels_last and not cfg.teacher.reset_head and cfg.teacher.checkpoint
    assert [(a.name, a.warmup, a.method) for a in resolve_arms(cfg)] == [
        ("kd", "none", "kd"), ("indistill_kd", "indistill", "kd")]
    assert "torchrun --standalone --nproc_per_node 8 -m indistill run configs/imagenet_resnet34_resnet18.yaml" in (
        IMAGENET_CONFIG.read_text())


@pytest.mark.slow  # ~20 s of CPU: ResNet-34/18 forwards at 224x224 for every stage and warmup phase
def test_imagenet_config_validates_on_a_tiny_imagefolder(tmp_path, capsys):
    from indistill.config import load_config
    from indistill.pipeline import build_model, load_data

    root = _tiny_imagefolder(tmp_path / "imagenet")
    # validate loads the teacher's weights: a stand-in of torchvision's file, with the tiny tree's class count
    cfg = load_config(IMAGENET_CONFIG, [f"data.root={root}"])
    ckpt = tmp_path / "resnet34-b627a593.pth"
    torch.save(build_model(cfg.teacher, load_data(cfg)).state_dict(), ckpt)
    code = main(["validate", str(IMAGENET_CONFIG), f"data.root={root}", f"teacher.checkpoint={ckpt}"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "arm indistill_kd: warmup=indistill method=kd" in out.out and "(imagenet: 2 train / 2 test)" in out.out


def test_other_commands_refuse_torchrun(monkeypatch, capsys):
    from indistill import distributed as ddp
    from indistill.config import load_config

    assert load_config(None, ["distributed.sync_bn=true"]).distributed.sync_bn is True
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["models"]) == 2
    assert "runs in one process; under torchrun use" in capsys.readouterr().err
    assert ddp.world_size() == 1 and ddp.is_main()  # nothing initialised without a process group
