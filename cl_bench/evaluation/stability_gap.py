"""Worst-case metrics of continual evaluation (De Lange, van de Ven, Tuytelaars, "Continual
evaluation for lifelong learning: Identifying the stability gap", ICLR 2023), as pure functions.

Input: the points of a run's continual evaluation, in stream order. Point p was taken at stream
step ``steps[p]`` while task ``training[p]`` (0-based) was being trained; ``scores[name][p]`` is
task ``name``'s score there (higher is better: the task's metric or the answer log-likelihood), or
None where the task had not been seen yet. Task k of the stream is column ``names[k]``. Every
task's last point is its final step (the evaluator always scores there), so
``A(E_k, f_|D_k|)`` = task k's score at the last point with ``training == k``:

    min-ACC(E_i)  = min_{p: training[p] > i} A(E_i, p)          (after i's training ended: the
                                                                  paper's min over n < t)
    avg-min-ACC   = (1 / (k-1)) sum_{i<k} min-ACC(E_i)           (k = tasks trained so far)
    WC-ACC_k      = (1/k) A(E_k, f_|D_k|) + (1 - 1/k) avg-min-ACC
    WF^w(E_i)     = max(0, max_{p<q, q-p<w} A(E_i, p) - A(E_i, q))  over task i's own points
                    (any w consecutive evaluations of it, from its first; as the authors'
                    ``WindowedForgettingPluginMetric`` keeps a deque of w)
    WF^w          = mean of WF^w(E_i) over every task evaluated so far, the one in training
                    included, as the authors' ``TaskAveragingPluginMetric`` averages it (their
                    reported ``avg_F10_final`` is its value at the end of the stream)

The paper evaluates after every iteration, so its windows of w iterations are windows of w
evaluations; here evaluations come every ``eval.continual.every_n_steps`` steps and a window is
w evaluations (w x every_n_steps steps). Metrics over tasks none of whose terms exist are None.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean

Scores = dict[str, Sequence[float | None]]


def _check(steps: Sequence[int], training: Sequence[int], scores: Scores, names: Sequence[str]) -> None:
    if len(steps) != len(training) or any(len(scores[n]) != len(steps) for n in names):
        raise ValueError("continual evaluation: steps, training and every task's scores need one entry per point")
    if any(b < a for a, b in zip(training, training[1:])):
        raise ValueError("continual evaluation: the points must be in stream order (training index never decreases)")


def min_acc(steps, training, scores: Scores, names: Sequence[str]) -> dict[str, float | None]:
    """Per task, its lowest score after its own training ended (None for the task still in training
    and for tasks no later point scored)."""
    _check(steps, training, scores, names)
    out: dict[str, float | None] = {}
    for i, name in enumerate(names):
        later = [s for t, s in zip(training, scores[name]) if t > i and s is not None]
        out[name] = min(later) if later else None
    return out


def avg_min_acc(steps, training, scores: Scores, names: Sequence[str]) -> float | None:
    """The mean min-ACC over the tasks trained before the latest one."""
    k = max(training) + 1 if training else 0
    values = [v for v in list(min_acc(steps, training, scores, names).values())[: k - 1] if v is not None]
    return fmean(values) if values else None


def final_score(training, scores: Scores, names: Sequence[str], k: int) -> float | None:
    """A(E_k, f_|D_k|): task k's score at the last point of its own training."""
    mine = [s for t, s in zip(training, scores[names[k]]) if t == k]
    return mine[-1] if mine and mine[-1] is not None else None


def wc_acc(steps, training, scores: Scores, names: Sequence[str]) -> float | None:
    """Worst-case accuracy after the latest trained task k: (1/k) its final score plus (1 - 1/k)
    avg-min-ACC of the tasks before it."""
    if not training:
        return None
    k = max(training) + 1
    current = final_score(training, scores, names, k - 1)
    if current is None:
        return None
    if k == 1:
        return current
    previous = avg_min_acc(steps, training, scores, names)
    return None if previous is None else current / k + (1 - 1 / k) * previous


def max_drop(values: Sequence[float], window: int) -> float:
    """max(0, max a_p - a_q over p < q < p + window): the largest fall within any ``window``
    consecutive values."""
    if window < 2:
        raise ValueError(f"a forgetting window needs at least 2 evaluations, got {window}")
    best = 0.0
    for q, later in enumerate(values):
        earlier = values[max(0, q - window + 1) : q]
        if earlier:
            best = max(best, max(earlier) - later)
    return best


def windowed_forgetting(
    steps,
    training,
    scores: Scores,
    names: Sequence[str],
    window: int,
) -> tuple[float | None, dict[str, float | None]]:
    """(WF^w averaged over every task evaluated so far, WF^w of each of them), w = ``window``
    evaluations; tasks never evaluated are None and left out of the average."""
    _check(steps, training, scores, names)
    per_task = {}
    for name in names:
        seen = [s for s in scores[name] if s is not None]
        per_task[name] = max_drop(seen, window) if seen else None
    evaluated = [v for v in per_task.values() if v is not None]
    return (fmean(evaluated) if evaluated else None), per_task


def continual_metrics(
    steps,
    training,
    scores: Scores,
    names: Sequence[str],
    windows: Sequence[int] = (10,),
) -> dict:
    """Every metric above: ``min_acc`` per task, ``avg_min_acc``, ``wc_acc``, ``wf{w}`` and
    ``wf{w}_per_task`` for each window."""
    out = {
        "min_acc": min_acc(steps, training, scores, names),
        "avg_min_acc": avg_min_acc(steps, training, scores, names),
        "wc_acc": wc_acc(steps, training, scores, names),
    }
    for w in windows:
        out[f"wf{w}"], out[f"wf{w}_per_task"] = windowed_forgetting(steps, training, scores, names, w)
    return out


def curve_metrics(curves: dict | None, names: Sequence[str]) -> dict:
    """results.json's ``continual_metrics`` from its ``continual`` curves (steps, training, scores,
    windows, measures): every metric above, or {} without points. Where tasks are scored in
    different measures (a metric here, log-likelihood there) only the per-task values exist: an
    average over both would mix units. The report recomputes stored runs with it, so runs recorded
    under an earlier rule are compared under the current one."""
    if not curves or not curves.get("steps"):
        return {}
    out = continual_metrics(
        curves["steps"], curves["training"], curves["scores"], names, curves.get("windows", (10, 100))
    )
    if len(set(curves["measures"].values())) > 1:
        out = {k: (v if isinstance(v, dict) else None) for k, v in out.items()}
    return out
