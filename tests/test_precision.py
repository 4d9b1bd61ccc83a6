"""`precision: auto`: bf16 only where the device runs it natively; explicit bf16 on an emulating CPU warns once."""

import logging
import warnings
from contextlib import nullcontext

import pytest
import torch

from indistill import engine
from indistill.config import Config, dump_config, load_config
from indistill.engine import Engine, native_bf16, resolve_config_precision, resolve_precision
from indistill.errors import UserError

AVX2 = "AVX2"  # the CPU: autocast bf16 emulated, 15x slower
AMX = "AVX512 AVX512_BF16 AMX"  # a CPU with native bf16 units


def _engine(precision: str) -> Engine:
    """An engine with nothing to train: only its precision handling is looked at (no run directory is made)."""
    return Engine("unused", None, precision=precision, logger=logging.getLogger("test_precision"))


@pytest.fixture
def cpu(monkeypatch):
    """Set the CPU capability the engine sees; re-arm the once-per-process warning."""
    monkeypatch.setattr(engine, "_emulated_bf16_warned", False)

    def set_capability(cap: str) -> None:
        monkeypatch.setattr(engine, "cpu_capability", lambda: cap)

    return set_capability


def test_auto_is_fp32_on_a_cpu_without_native_bf16(cpu):
    cpu(AVX2)
    assert not native_bf16("cpu")
    assert resolve_precision("auto", "cpu") == "fp32"
    cpu("AVX512")  # AVX512 without AVX512_BF16 emulates bf16 too
    assert resolve_precision("auto", "cpu") == "fp32"


def test_auto_is_bf16_on_a_cpu_with_native_bf16(cpu):
    cpu(AMX)
    assert native_bf16("cpu")
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    cpu("AVX512 AVX512_BF16")
    assert resolve_precision("auto", "cpu") == "bf16"


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_on_cuda_follows_the_gpu(monkeypatch, bf16):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert native_bf16("cuda") is bf16
    assert resolve_precision("auto", "cuda:0") == ("bf16" if bf16 else "fp32")


def test_other_values_pass_through(cpu):
    cpu(AVX2)
    for value in (None, "fp32", "fp16"):
        assert resolve_precision(value, "cpu") == value


def test_explicit_bf16_on_an_emulating_cpu_warns_once_with_the_cost(cpu):
    cpu(AVX2)
    with pytest.warns(UserWarning, match="15x slower") as got:
        assert resolve_precision("bf16", "cpu") == "bf16"  # the user's choice is kept
    assert "AVX2" in str(got[0].message) and "precision=auto" in str(got[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        resolve_precision("bf16", "cpu")
        _engine(precision="bf16")


def test_explicit_bf16_on_a_native_cpu_is_silent(cpu):
    cpu(AMX)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", "cpu") == "bf16"


def test_engine_autocast_resolves_auto(cpu):
    cpu(AVX2)
    e = _engine(precision="auto")
    assert e.precision == "fp32" and isinstance(e._autocast(), nullcontext)
    assert isinstance(e._autocast("auto"), nullcontext)
    cpu(AMX)
    e = _engine(precision="auto")
    assert e.precision == "bf16"
    ctx = e._autocast()
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    # a stage's own `auto` resolves the same way; a stage's fp32 overrides the run's bf16
    assert isinstance(e._autocast("auto"), torch.autocast)
    assert isinstance(e._autocast("fp32"), nullcontext)


def test_config_default_and_choices():
    assert Config().precision == "auto"
    cfg = load_config(None, ["precision=auto", "teacher.train.precision=auto"])
    assert cfg.teacher.train.precision == "auto"
    with pytest.raises(UserError, match="fp8"):
        load_config(None, ["precision=fp8"])


def test_config_resolution_records_what_runs(cpu):
    cpu(AVX2)
    cfg = load_config(None, ["teacher.train.precision=auto", "student.train.precision=fp16"])
    resolve_config_precision(cfg, torch.device("cpu"))
    assert (cfg.precision, cfg.teacher.train.precision, cfg.student.train.precision, cfg.auxiliary.ce.precision) == (
        "fp32", "fp32", "fp16", None)
    assert "precision: auto" not in dump_config(cfg)
    cpu(AMX)
    cfg = load_config(None, ["teacher.train.precision=auto"])
    resolve_config_precision(cfg, "cpu")
    assert (cfg.precision, cfg.teacher.train.precision) == ("bf16", "bf16")


def test_a_run_made_before_auto_still_resumes(cpu, tmp_path):
    # Run directories recorded `precision: fp32` (the old default); the same command under the new
    # default `auto` on a CPU without native bf16 is the same run, not "a different config".
    from indistill.pipeline import Pipeline

    cpu(AVX2)
    args = ["data.name=digits", "data.train_subset=50", "data.test_subset=20", f"out_dir={tmp_path}", "name=r",
            "device=cpu"]
    old = load_config(None, [*args, "precision=fp32"])
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text(dump_config(old))
    p = Pipeline(load_config(None, args))
    assert p.cfg.precision == "fp32" and p.engine.precision == "fp32"
    p.rundir.check(p.cfg)  # raises UserError on a different config


def test_shipped_configs_default_to_auto():
    from indistill.cli import packaged_config

    for name in ("demo_digits.yaml", "fashion_mnist.yaml", "methods_digits.yaml", "cifar10_paper.yaml",
                 "imagenet_resnet34_resnet18.yaml"):
        assert load_config(packaged_config(name), ["data.root=/nowhere"]).precision == "auto", name
    # these two keep what their committed results ran with: fp32 students, a bf16 teacher
    for name in ("paper_fashion_mnist.yaml", "methods_fashion_mnist.yaml"):
        cfg = load_config(packaged_config(name), [])
        assert (cfg.precision, cfg.teacher.train.precision) == ("fp32", "bf16"), name
