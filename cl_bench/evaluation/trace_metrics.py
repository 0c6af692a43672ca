"""TRACE's own scorers, as its ``metrics.py`` and ``evaluations/eval_<Task>.py`` compute them.

TRACE scores the raw decoded answer (``skip_special_tokens=True``, ``clean_up_tokenization_spaces
=False``, nothing stripped) against the raw reference; the run decodes that way when the stream's
scorers are ``trace`` (``tasks.scorers``). Per task (all on 0-100 here; TRACE reports accuracy on
0-1):

    C-STANCE, FOMC, NumGLUE-cm/-ds   trace_accuracy              prediction == reference
    ScienceQA                        trace_first_char_accuracy   prediction[0] == reference[0]
    MeetingBank                      trace_rouge_l               the ``rouge`` package's ROUGE-L F
    Py150                            trace_edit_similarity       fuzzywuzzy ``fuzz.ratio`` (an int)
                                                                 after TRACE's literal placeholders
    20Minuten                        trace_sari                  Hugging Face's ``sari`` (13a tokens)

In every one but SARI a pair whose prediction or reference is empty is skipped and the sum is
divided by the number of all examples, so it counts 0. Where TRACE's code would stop with an
error (ScienceQA's first character of an empty string; ``rouge`` refusing a prediction with no
words, such as "..."), the pair counts 0 here (docs/fidelity.md).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence

from cl_bench.evaluation.sari import sari

with warnings.catch_warnings():  # fuzzywuzzy's note that python-Levenshtein is absent (so is it in TRACE's setup)
    warnings.simplefilter("ignore", UserWarning)
    from fuzzywuzzy import fuzz
from rouge import Rouge

_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def _skipping_mean(score: Callable[[str, str], float], predictions: Sequence[str], answers: Sequence[str]) -> float:
    """TRACE's average: pairs with an empty side are skipped, the sum divided by all pairs."""
    total = sum(score(p, a) for p, a in zip(predictions, answers) if p != "" and a != "")
    return total / len(predictions) if predictions else 0.0


def trace_accuracy(predictions, answers, prompts=None) -> float:
    """Exact match of the raw strings (``caculate_accuracy``)."""
    return 100.0 * _skipping_mean(lambda p, a: float(p == a), predictions, answers)


def trace_first_char_accuracy(predictions, answers, prompts=None) -> float:
    """ScienceQA: the first raw character (the option letter) of each, then exact match."""
    return trace_accuracy([p[:1] for p in predictions], [a[:1] for a in answers])


def _rouge_l_f(answer: str, prediction: str) -> float:
    try:  # in TRACE's order: the reference as ``hyps``, the prediction as ``refs``
        return Rouge(metrics=["rouge-l"]).get_scores(answer, prediction, avg=True)["rouge-l"]["f"]
    except ValueError:  # "Collections must contain at least 1 sentence": no words on a side
        return 0.0


def trace_rouge_l(predictions, answers, prompts=None) -> float:
    """ROUGE-L F of the ``rouge`` package (``caculate_rouge``)."""
    return 100.0 * _skipping_mean(lambda p, a: _rouge_l_f(a, p), predictions, answers)


def py150_postprocess(code: str) -> str:
    """TRACE's Py150 literals: ``<NUM_LIT>`` -> 0, ``<STR_LIT>``/``<CHAR_LIT>`` -> "", ``<X_LIT:v>`` -> v."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    for kind, value in _LITERAL.findall(code):
        code = code.replace(f"<{kind}_LIT:{value}>", value)
    return code


def trace_edit_similarity(predictions, answers, prompts=None) -> float:
    """fuzzywuzzy's ``fuzz.ratio`` after the Py150 post-processing (``caculate_fuzz``), already 0-100."""
    return _skipping_mean(
        fuzz.ratio, [py150_postprocess(p) for p in predictions], [py150_postprocess(a) for a in answers]
    )


def trace_sari(predictions, answers, prompts) -> float:
    """Hugging Face ``sari`` (``load_metric("sari")``): lower-cased sacrebleu 13a tokens, every pair."""
    return sari(list(prompts), list(predictions), [[a] for a in answers], tokenizer="13a")


#: the project's metric name -> TRACE's scorer for it (``tasks.scorers: trace``)
TRACE_SCORERS = {
    "accuracy": "trace_accuracy",
    "first_letter_accuracy": "trace_first_char_accuracy",
    "rouge_l": "trace_rouge_l",
    "edit_similarity": "trace_edit_similarity",
    "sari": "trace_sari",
}
