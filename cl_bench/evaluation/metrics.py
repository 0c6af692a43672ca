"""Per-task metrics, each a named pure function on a 0-100 scale.

Signature: ``metric(predictions, answers, prompts) -> float``. ``prompts`` are the sources that
SARI needs; the other metrics ignore them. Tasks name their metric by its key in :data:`METRICS`
(the task-to-metric table is the stream's config).

TRACE's conventions (its ``metrics.py``), kept here: every metric averages over all examples; an
empty prediction or an empty reference scores 0 (TRACE skips the pair but still divides by the
number of examples), even where the library would call two empty strings equal. TRACE reports
accuracy on 0-1 and edit similarity on 0-100; everything here is on 0-100.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import cache

from rapidfuzz import fuzz

from cl_bench.data.tasks import SCORERS, TaskStream
from cl_bench.errors import ConfigError, check_choice
from cl_bench.evaluation import trace_metrics
from cl_bench.evaluation.sari import sari

Metric = Callable[[Sequence[str], Sequence[str], Sequence[str]], float]


def _mean(values: Sequence[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else 0.0


def _both_non_empty(prediction: str, answer: str) -> bool:
    return prediction.strip() != "" and answer.strip() != ""


def accuracy(predictions, answers, prompts=None) -> float:
    """Exact match after stripping surrounding whitespace."""
    return _mean([_both_non_empty(p, a) and p.strip() == a.strip() for p, a in zip(predictions, answers)])


def first_letter_accuracy(predictions, answers, prompts=None) -> float:
    """Match of the first non-space character (the option letter of a multiple-choice answer)."""
    return _mean([_both_non_empty(p, a) and p.strip()[0] == a.strip()[0] for p, a in zip(predictions, answers)])


@cache
def _rouge_scorer():
    """rouge-score's ROUGE-L scorer, built at first use (rouge-score imports nltk, half a second of
    every run's start otherwise)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(predictions, answers, prompts=None) -> float:
    """ROUGE-L F-measure (rouge-score's tokenizer: lower-cased alphanumeric tokens)."""
    scorer = _rouge_scorer()
    return _mean([scorer.score(a, p)["rougeL"].fmeasure for p, a in zip(predictions, answers)])


def normalize_answer(text: str) -> str:
    """The Super-NaturalInstructions normalisation O-LoRA, SAPT and GainLoRA score with
    (``compute_metrics.py``: SQuAD's, without removing articles): lower case, no punctuation,
    whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(text.split())


def exact_match(predictions, answers, prompts=None) -> float:
    """Exact match after :func:`normalize_answer`, against the best of an example's references
    (0-100): Long Sequence's and Standard's score."""
    return _mean(
        [
            max(float(normalize_answer(p) == normalize_answer(r)) for r in _references(a))
            for p, a in zip(predictions, answers)
        ]
    )


@cache
def _stemmed_rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_stemmed(predictions, answers, prompts=None) -> float:
    """SuperNI's score: ROUGE-L F-measure with rouge-score's Porter stemmer, on the raw texts, the
    best over an example's references (0-100), as the Super-NaturalInstructions
    ``compute_metrics.py`` that SAPT and GainLoRA ship."""
    scorer = _stemmed_rouge_scorer()
    return _mean(
        [max(scorer.score(r, p)["rougeL"].fmeasure for r in _references(a)) for p, a in zip(predictions, answers)]
    )


def _references(answer) -> tuple[str, ...]:
    return (answer,) if isinstance(answer, str) else tuple(answer)


def edit_similarity(predictions, answers, prompts=None) -> float:
    """fuzzywuzzy/rapidfuzz ``fuzz.ratio`` (normalised Indel similarity, 0-100), averaged."""
    values = [fuzz.ratio(p.strip(), a.strip()) if _both_non_empty(p, a) else 0.0 for p, a in zip(predictions, answers)]
    return sum(values) / len(values) if values else 0.0


def sari_metric(predictions, answers, prompts) -> float:
    """SARI with the prompt as source and the answer as the single reference."""
    return sari(list(prompts), list(predictions), [[a] for a in answers])


METRICS: dict[str, Metric] = {
    "accuracy": accuracy,
    "first_letter_accuracy": first_letter_accuracy,
    "rouge_l": rouge_l,
    "edit_similarity": edit_similarity,
    "sari": sari_metric,
    "exact_match": exact_match,
    "rouge_l_stemmed": rouge_l_stemmed,
    # TRACE's own scorers (cl_bench/evaluation/trace_metrics.py), chosen by tasks.scorers=trace
    **{name: getattr(trace_metrics, name) for name in trace_metrics.TRACE_SCORERS.values()},
}
#: ``tasks.scorers``: how a task's declared metric is scored
SCORER_SETS = {"project": {name: name for name in METRICS}, "trace": trace_metrics.TRACE_SCORERS}


def resolve_metrics(stream: TaskStream) -> TaskStream:
    """``stream`` with each task's declared metric named as its scorer set scores it
    (``tasks.scorers``), every name checked against the known metrics."""
    check_choice(stream.scorers, SCORERS, "tasks.scorers")
    for task in stream:
        scorer = SCORER_SETS[stream.scorers]
        metric, *also = (scorer.get(name, name) for name in (task.metric, *task.spec.also))
        for name, declared in zip((metric, *also), (task.metric, *task.spec.also)):
            if name not in METRICS:
                raise ConfigError(f"task {task.name}: unknown metric '{declared}'; known: {sorted(METRICS)}")
        task.spec = replace(task.spec, metric=metric, also=tuple(also))
    return stream


def also_scores(
    stream: TaskStream, predictions: dict[str, list[str]], split: str, max_examples: int | None
) -> dict[str, dict[str, float]]:
    """The scores of the metrics each task records beside its own (TaskSpec.also), by metric then
    task, on the examples a stage evaluated (the first ``max_examples`` of ``split``)."""
    also: dict[str, dict[str, float]] = {}
    for task in stream:
        examples = task.splits[split][:max_examples]
        refs, prompts = [e.scored_against for e in examples], [e.prompt for e in examples]
        for name in task.spec.also:
            also.setdefault(name, {})[task.name] = float(METRICS[name](predictions[task.name], refs, prompts))
    return also
