import pytest

from indistill.config import Config, dump_config, load_config
from indistill.errors import UserError


def test_defaults_and_overrides():
    cfg = load_config(None, ["kd.method=dkd", "student.train.optimizer.lr=1e-4", "warmup=none", "data.train_subset=100"])
    assert isinstance(cfg, Config)
    assert cfg.kd.method == "dkd"
    assert cfg.student.train.optimizer.lr == pytest.approx(1e-4)
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
    assert load_config(None, []).student.train.scheduler.name == "none"  # stage schedules follow the reference: constant


def test_arm_defaults_come_from_the_top_level_and_params_belong_to_their_method(tmp_path):
    from indistill.config import resolve_arms

    p = tmp_path / "c.yaml"
    p.write_text("kd: {method: pkt, params: {pkt: {variant: original}, dkd: {beta: 4}}}\n"
                 "arms:\n  - {name: a}\n  - {name: b, warmup: none}\n  - {name: c, method: kd, params: {T: 2}}\n")
    arms = {a.name: a for a in resolve_arms(load_config(p))}
    assert (arms["a"].warmup, arms["a"].method, arms["a"].params) == ("indistill", "pkt", {"variant": "original"})
    assert (arms["b"].warmup, arms["b"].method) == ("none", "pkt")
    assert (arms["c"].method, arms["c"].params) == ("kd", {"T": 2})
    # kd.method=dkd reaches the arms without their own method, with dkd's own params
    arms = {a.name: a for a in resolve_arms(load_config(p, ["kd.method=dkd"]))}
    assert (arms["a"].method, arms["a"].params) == ("dkd", {"beta": 4})
    # arm b sets its own warmup: warmup=none reaches a and c; an override that reaches no arm is an error
    assert [a.warmup for a in resolve_arms(load_config(p, ["warmup=indistill"]))] == ["indistill", "none", "indistill"]
    with pytest.raises(UserError, match="shadowed by arm c"):
        load_config(p, ["kd.params.kd.T=3"])
    q = tmp_path / "d.yaml"
    q.write_text("arms:\n  - {name: x, warmup: none}\n  - {name: y, warmup: indistill}\n")
    with pytest.raises(UserError, match="shadowed by arms x, y"):
        load_config(q, ["warmup=none"])
    assert [a.warmup for a in resolve_arms(load_config(None, ["warmup=none"]))] == ["none"]
