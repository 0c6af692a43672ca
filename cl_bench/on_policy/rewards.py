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

import inspect
import math
import numbers
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


#: the arguments a reward function is called with (TRL's reward-function signature)
CALL = ("prompts", "completions", "completion_ids", "answer", "task", "metric", "trainer_state")


def check_signature(function: Callable, name: str) -> None:
    """Refuse, before anything loads, a reward function that cannot take TRL's arguments
    (:data:`CALL`, by keyword), naming ``learning.reward``."""
    try:
        inspect.signature(function).bind(**dict.fromkeys(CALL))
    except TypeError as e:
        raise ConfigError(
            f"learning.reward ({name}) cannot be called with TRL's reward arguments ({', '.join(CALL)}, by "
            f"keyword; **kwargs takes the ones it does not name): {e}"
        ) from None
    except ValueError:  # a builtin without a signature: called as it is
        pass


def checked_rewards(values, expected: int, name: str) -> list[float]:
    """A reward function's output as floats, NaN where it scored nothing (None, NaN or infinite: as
    in TRL); refused with one clear error when it is not one number (or None) per completion."""
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != expected:
        got = len(values) if isinstance(values, Sequence) else type(values).__name__
        raise ConfigError(
            f"learning.reward ({name}) must return one reward per completion: {expected} expected, got {got}"
        )
    wrong = next((v for v in values if v is not None and not isinstance(v, numbers.Real)), None)
    if wrong is not None:
        raise ConfigError(
            f"learning.reward ({name}) must return numbers (or None for a completion it does not score), "
            f"got {type(wrong).__name__} {wrong!r:.40}"
        )
    return [math.nan if v is None or not math.isfinite(v) else float(v) for v in values]
