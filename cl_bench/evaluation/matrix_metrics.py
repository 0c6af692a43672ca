"""Continual-learning metrics as pure functions of the score matrix (TRACE.md's definitions).

``R`` is a list of rows: ``R[0]`` holds the untrained model's scores and ``R[t]`` the scores after
training through task t (1-based stages); ``R[t][i - 1]`` is task i's score, so every row has one
column per task of the stream. A matrix with rows 0..t describes the run after stage t, and each
metric below is the metric *at stage t* (t = T gives the final values):

    OP_t        = (1/t) sum_{i<=t} R[t][i]
    mean OP     = (1/t) sum_{s<=t} OP_s                     (FGGM's "TRACE-OP")
    BWT_t       = (1/(t-1)) sum_{i<t} (R[t][i] - R[i][i])   (GEM convention; bwt_over_t uses 1/t)
    FWT_t       = (1/(t-1)) sum_{2<=i<=t} (R[i-1][i] - R[0][i])
    Forgetting  = (1/(t-1)) sum_{i<t} (max_{1<=l<t} R[l][i] - R[t][i])

Metrics that need two stages are ``None`` at stage 1.
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float]]


def _stage(R: Matrix) -> int:
    t = len(R) - 1
    if t < 1:
        raise ValueError("the score matrix needs row 0 and at least one trained row")
    if t > len(R[0]):
        raise ValueError(f"{t} trained rows but only {len(R[0])} tasks")
    return t


def _r(R: Matrix, t: int, i: int) -> float:
    """R[t][i] with 1-based task index i."""
    return R[t][i - 1]


def op(R: Matrix) -> float:
    t = _stage(R)
    return sum(_r(R, t, i) for i in range(1, t + 1)) / t


def mean_op(R: Matrix) -> float:
    t = _stage(R)
    return sum(op(R[: s + 1]) for s in range(1, t + 1)) / t


def bwt(R: Matrix) -> float | None:
    t = _stage(R)
    if t < 2:
        return None
    return sum(_r(R, t, i) - _r(R, i, i) for i in range(1, t)) / (t - 1)


def bwt_over_t(R: Matrix) -> float | None:
    """BWT with denominator t instead of t - 1 (used by some CL papers)."""
    t = _stage(R)
    if t < 2:
        return None
    return sum(_r(R, t, i) - _r(R, i, i) for i in range(1, t)) / t


def fwt(R: Matrix) -> float | None:
    t = _stage(R)
    if t < 2:
        return None
    return sum(_r(R, i - 1, i) - _r(R, 0, i) for i in range(2, t + 1)) / (t - 1)


def forgetting(R: Matrix) -> float | None:
    t = _stage(R)
    if t < 2:
        return None
    drops = [max(_r(R, s, i) for s in range(1, t)) - _r(R, t, i) for i in range(1, t)]
    return sum(drops) / len(drops)


CL_METRICS = {
    "op": op,
    "mean_op": mean_op,
    "bwt": bwt,
    "bwt_over_t": bwt_over_t,
    "fwt": fwt,
    "forgetting": forgetting,
}


def all_metrics(R: Matrix) -> dict[str, float | None]:
    return {name: fn(R) for name, fn in CL_METRICS.items()}
