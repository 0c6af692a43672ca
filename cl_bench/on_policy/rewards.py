"""Rewards of completions, called with TRL's reward-function signature.

A reward function takes ``prompts`` and ``completions`` (lists of strings, one per completion),
``completion_ids`` (lists of token ids) and, as keyword arguments, the columns of each completion's
example: ``answer`` (what the task scores against: the reference answer, or a SuperNI instance's
references), ``task`` and ``metric`` (the task's name and metric). It returns one float per
completion, or None for a completion it does not score: as in TRL, such a completion is left out of
its group's mean and std and gets advantage 0 (a NaN, or an infinite value, counts as None).
``learning.reward`` chooses it by ``_target_``; the default is :class:`TaskScore`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from cl_bench.errors import ConfigError
from cl_bench.evaluation.metrics import METRICS

RewardFunction = Callable[..., list]


class TaskScore:
    """The task's own metric on each completion against its example's reference, on 0-1: exact
    match and accuracy give 0 or 1; ROUGE-L, edit similarity and SARI give continuous rewards
    (each metric is the 0-100 score of cl_bench/evaluation/metrics.py on one example, / 100)."""

    __name__ = "task_score"

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]] | None = None,
        *,
        answer: Sequence,
        metric: Sequence[str],
        **columns,
    ) -> list[float]:
        return [METRICS[m]([c], [a], [p]) / 100.0 for p, c, a, m in zip(prompts, completions, answer, metric)]


def checked_rewards(values, expected: int, name: str) -> list[float]:
    """A reward function's output as floats, NaN where it scored nothing (None or not finite); refused
    with one clear error when it is not one value per completion."""
    if not isinstance(values, Sequence) or len(values) != expected:
        got = len(values) if isinstance(values, Sequence) else type(values).__name__
        raise ConfigError(
            f"learning.reward ({name}) must return one reward per completion: {expected} expected, got {got}"
        )
    return [math.nan if v is None or not math.isfinite(float(v)) else float(v) for v in values]
