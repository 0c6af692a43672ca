"""Per-example forgetting and backward transfer: what a task's score hides (Harmon, Hochlehnert,
Bethge, Prabhu, "Mapping Post-Training Forgetting in Language Models at Scale", ICLR 2026, §2;
code: post-forget/post-forget, ``src/analyze/create_csv.py``).

For the N test examples of a task, right (1) or wrong (0) at two stages, ``before`` and ``after``:

    F  = (1/N) #{1 -> 0}          BT = (1/N) #{0 -> 1}          (a_after - a_before = BT - F)

On a task with k answer options, a model that does not know an item guesses one of k, so a flip
can be luck. With mean accuracies a_pre and a_post, the chance level of either flip is

    chance = (1 - a_pre)(1 - a_post) / (k - 1)

and F_true = max(F - chance, 0), BT_true = max(BT - chance, 0), with the ceilings
F_max = max((k a_pre - 1) / (k - 1), 0) and BT_max = max((k a_post - 1) / (k - 1), 0). k is
the task's own (:func:`task_options`): the options its prompts offer where they offer them (O-LoRA's
"Option: a, b, c" line from labels.json, lettered choices such as the embedded sentiment task's or
ScienceQA's), else the number of distinct answers of its whole split; never that of the evaluated
examples alone, which can miss a label (16 examples of a 4-option task without a "D" would count
3). Tasks without options (generation) get no adjustment (k is None).

The run compares each task's stage right after it was trained with the latest stage; an example is
right when its own score by the task's metric reaches ``threshold`` (0-100: 100 for exact-match
metrics, a named threshold for ROUGE-L, edit similarity or SARI).
"""

from __future__ import annotations

from collections.abc import Sequence

from cl_bench.data.options import answer_options, declared_options
from cl_bench.data.tasks import Task, TaskStream
from cl_bench.evaluation.metrics import METRICS

#: metrics whose score of one example is 0 or 100: an example is right at 100 whatever the threshold
BINARY_METRICS = ("accuracy", "first_letter_accuracy", "exact_match", "trace_accuracy", "trace_first_char_accuracy")


def right_answers(metric_name: str, metric, predictions, answers, prompts, threshold: float) -> list[bool]:
    """Whether each example is right: its own score by the task's metric is 100 (a binary metric) or
    at least ``threshold`` (0-100; ROUGE-L, edit similarity, SARI)."""
    bar = 100.0 if metric_name in BINARY_METRICS else threshold
    return [metric([p], [a], [q]) >= bar for p, a, q in zip(predictions, answers, prompts)]


def stream_right_answers(
    stream: TaskStream, predictions: dict[str, list[str]], split: str, max_examples: int | None, threshold: float
) -> dict[str, list[bool]]:
    """Per task, whether each example a stage evaluated (the first ``max_examples`` of ``split``) is
    right by :func:`right_answers`."""
    right = {}
    for task in stream:
        examples = task.splits[split][:max_examples]
        refs, prompts = [e.scored_against for e in examples], [e.prompt for e in examples]
        metric = METRICS[task.metric]
        right[task.name] = right_answers(task.metric, metric, predictions[task.name], refs, prompts, threshold)
    return right


def task_options(task: Task, split: str, max_examples: int | None) -> int | float | None:
    """k of ``task`` for the chance adjustment: the options that the prompts of the examples a stage
    evaluates (the first ``max_examples`` of ``split``) offer (:func:`declared_options`), where an
    example is right by an exact match (a binary metric: a free-text task's prompt may hold lines
    that only look like choices, a dialogue's "A: ..."); else the distinct answers of the whole
    split (:func:`answer_options`), which a subsample can miss."""
    examples = task.splits[split]
    if task.metric in BINARY_METRICS:
        declared = declared_options([e.prompt for e in examples[:max_examples]])
        if declared is not None:
            return declared
    return answer_options([e.answer for e in examples])


def stream_options(stream: TaskStream, split: str, max_examples: int | None) -> dict[str, int | float | None]:
    """Per task, its k by :func:`task_options` (what a run's recorder adjusts its flips with)."""
    return {task.name: task_options(task, split, max_examples) for task in stream}


def flips(
    before: Sequence[bool], after: Sequence[bool], options: int | float | None = None
) -> dict[str, float | int | None]:
    """F, BT, their chance-adjusted values and ceilings (``options`` = k, None for no adjustment),
    and the two accuracies, on 0-1; ``before`` and ``after`` align example by example."""
    if len(before) != len(after) or not before:
        raise ValueError(f"per-example results must align and be non-empty ({len(before)} vs {len(after)})")
    n = len(before)
    forgotten = sum(b and not a for b, a in zip(before, after)) / n
    gained = sum(a and not b for b, a in zip(before, after)) / n
    acc_pre, acc_post = sum(before) / n, sum(after) / n
    out: dict[str, float | int | None] = {
        "n": n,
        "options": options,
        "right_before": acc_pre,
        "right_after": acc_post,
        "forgotten": forgotten,
        "gained": gained,
        "forgotten_beyond_chance": None,
        "gained_beyond_chance": None,
        "max_forgotten": None,
        "max_gained": None,
    }
    if options is not None and options > 1:
        chance = (1 - acc_pre) * (1 - acc_post) / (options - 1)
        out.update(
            forgotten_beyond_chance=max(forgotten - chance, 0.0),
            gained_beyond_chance=max(gained - chance, 0.0),
            max_forgotten=max((options * acc_pre - 1) / (options - 1), 0.0),
            max_gained=max((options * acc_post - 1) / (options - 1), 0.0),
        )
    return out


def example_flips(per_task: dict[str, dict]) -> dict[str, float | None]:
    """A run's summary of its tasks' flips (results.json's ``example_forgetting``), in % of examples,
    averaged over the tasks: ``ex_forgotten`` and ``ex_gained``, each beyond chance where the task
    has answer options, raw where it has none; None without tasks."""
    if not per_task:
        return {"ex_forgotten": None, "ex_gained": None}

    def mean(kind: str) -> float:
        adjusted = [f[f"{kind}_beyond_chance"] for f in per_task.values()]
        values = [f[kind] if a is None else a for a, f in zip(adjusted, per_task.values())]
        return 100 * sum(values) / len(values)

    return {"ex_forgotten": mean("forgotten"), "ex_gained": mean("gained")}
