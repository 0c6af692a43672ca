import pytest

from cl_bench.evaluation.matrix_metrics import all_metrics, bwt, bwt_over_t, forgetting, fwt, mean_op, op

# Rows: base, after task 1, 2, 3. Columns: tasks 1..3.
R = [
    [10.0, 20.0, 30.0],
    [80.0, 25.0, 35.0],
    [60.0, 90.0, 40.0],
    [50.0, 70.0, 95.0],
]


def test_op_and_mean_op():
    assert op(R) == pytest.approx((50 + 70 + 95) / 3)
    assert op(R[:2]) == 80.0
    assert op(R[:3]) == 75.0
    assert mean_op(R) == pytest.approx((80 + 75 + 215 / 3) / 3)


def test_bwt_both_denominators():
    # (R3,1 - R1,1) + (R3,2 - R2,2) = (50 - 80) + (70 - 90) = -50
    assert bwt(R) == pytest.approx(-50 / 2)
    assert bwt_over_t(R) == pytest.approx(-50 / 3)


def test_fwt():
    # (R1,2 - R0,2) + (R2,3 - R0,3) = (25 - 20) + (40 - 30) = 15
    assert fwt(R) == pytest.approx(15 / 2)


def test_forgetting_uses_the_best_earlier_trained_row():
    # task 1: max(80, 60) - 50 = 30; task 2: max(25, 90) - 70 = 20
    assert forgetting(R) == pytest.approx(25.0)


def test_two_stage_metrics_are_none_after_one_task():
    m = all_metrics(R[:2])
    assert m["op"] == 80.0 and m["bwt"] is None and m["fwt"] is None and m["forgetting"] is None


def test_bad_matrices_are_refused():
    with pytest.raises(ValueError, match="at least one trained row"):
        op(R[:1])
    with pytest.raises(ValueError, match="only 1 tasks"):
        op([[1.0], [2.0], [3.0]])
