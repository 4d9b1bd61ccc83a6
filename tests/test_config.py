import pytest

from indistill.config import Config, dump_config, load_config
from indistill.errors import UserError


def test_defaults_and_overrides():
    cfg = load_config(None, ["kd.method=dkd", "kd.train.optimizer.lr=1e-4", "warmup=none", "data.train_subset=100"])
    assert isinstance(cfg, Config)
    assert cfg.kd.method == "dkd"
    assert cfg.kd.train.optimizer.lr == pytest.approx(1e-4)
    assert cfg.warmup.mode == "none"
    assert cfg.data.train_subset == 100


def test_yaml_file_and_roundtrip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\nteacher: {name: resnet20, train: {epochs: 3}}\narms:\n  - {name: a, warmup: none, method: kd}\n")
    cfg = load_config(p, ["teacher.train.epochs=4"])
    assert cfg.teacher.name == "resnet20" and cfg.teacher.train.epochs == 4
    assert cfg.arms[0].method == "kd" and cfg.arms[0].warmup == "none"
    q = tmp_path / "d.yaml"
    q.write_text(dump_config(cfg))
    assert load_config(q) == cfg


@pytest.mark.parametrize(
    "override, words",
    [
        (["kd.metod=dkd"], ["metod", "method"]),
        (["precision=fp8"], ["fp8", "bf16"]),
        (["teacher.train.epochs=many"], ["epochs", "integer"]),
        (["warmup.importance=random"], ["importance", "l1"]),
        (["arms=[{name: a, warmup: maybe}]"], ["maybe", "indistill"]),
        (["nonsense"], ["KEY=VALUE"]),
    ],
)
def test_bad_input_is_one_line_user_error(override, words):
    with pytest.raises(UserError) as e:
        load_config(None, override)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(bad)


def test_partial_block_keeps_the_fields_own_defaults(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train: {epochs: 5}\nteacher: {train: {optimizer: {name: sgd, lr: 0.1}}}\n")
    cfg = load_config(cfg_file, [])
    assert cfg.train.epochs == 5 and cfg.train.scheduler.name == "cosine"  # `indistill train` anneals by default
    assert cfg.train.optimizer.lr == 2e-3
    assert cfg.teacher.train.epochs == load_config(None, []).teacher.train.epochs == 20
    assert cfg.teacher.train.optimizer.name == "sgd" and cfg.teacher.train.optimizer.lr == 0.1
    assert load_config(cfg_file, ["train.scheduler.name=none"]).train.scheduler.name == "none"
    assert load_config(None, []).kd.train.scheduler.name == "none"  # stage schedules follow the reference: constant
