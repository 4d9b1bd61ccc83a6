import pytest

from indistill.curriculum import default_schedule
from indistill.errors import UserError


def test_default_schedule_follows_method_table():
    s = default_schedule(["stage1", "stage2", "stage3"], a=2, total_epochs=20)
    assert [(p.tap, p.loss, p.epochs) for p in s] == [
        ("stage1", "mse", 3), ("stage2", "mse", 4), ("stage3", "mse", 5), ("embedding", "pkt", 8),
    ]
    assert s.total == 20
    # one phase (one loss) per epoch, in order, shallow to deep
    taps = [s.phase_at(e).tap for e in range(20)]
    assert taps == ["stage1"] * 3 + ["stage2"] * 4 + ["stage3"] * 5 + ["embedding"] * 8
    with pytest.raises(IndexError):
        s.phase_at(20)


def test_explicit_phase_epochs_and_no_embedding_phase():
    s = default_schedule(["a", "b"], phase_epochs=[1, 2], total_epochs=3)
    assert [(p.tap, p.epochs, p.start) for p in s] == [("a", 1, 0), ("b", 2, 1)]
    s = default_schedule(["a"], a=1, total_epochs=10, embedding_loss="none")
    assert s.total == 2


def test_schedule_errors():
    with pytest.raises(UserError, match="shorter than its tap phases"):
        default_schedule(["a", "b", "c"], a=2, total_epochs=5)
    with pytest.raises(UserError, match="one per tap"):
        default_schedule(["a", "b"], phase_epochs=[1])
