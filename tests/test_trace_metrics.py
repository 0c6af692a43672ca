"""TRACE's scorers equal TRACE's metrics.py / eval_<Task>.py, restated here on the reference
libraries (rouge 1.0.1, fuzzywuzzy, sacrebleu's 13a tokenizer), on predictions that exercise every
rule: raw whitespace, empty strings, Py150 literals, multi-sentence summaries, German text."""

import re
from collections import Counter

import pytest
from fuzzywuzzy import fuzz
from rouge import Rouge
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from cl_bench.evaluation.metrics import METRICS
from cl_bench.evaluation.trace_metrics import (
    py150_postprocess,
    trace_accuracy,
    trace_edit_similarity,
    trace_first_char_accuracy,
    trace_rouge_l,
    trace_sari,
)

ANSWERS = [
    "A",
    "B",
    "The council voted to approve the plan. It meets in May.",
    "",
    "Die Katze sitzt auf der Matte.",
    "result = <NUM_LIT>",
    "x",
]
PREDICTIONS = [
    " A",
    "B",
    "The council approved the plan. Next meeting: May.",
    "anything",
    "Die Katze sass auf der Matte.",
    "result = 0",
    "",
]


# --- TRACE's code, restated ------------------------------------------------------------------------
def trace_mean(score, results, data):
    total = 0.0
    for prediction, target in zip(results, data):
        if prediction == "" or target == "":
            continue
        total += score(prediction, target)
    return total / len(results)


def ref_rouge(prediction, target):
    return Rouge(metrics=["rouge-l"]).get_scores(target, prediction, avg=True)["rouge-l"]["f"]


def ref_postprocess(code):
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    for lit in re.findall(re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S), code):
        code = code.replace(f"<{lit[0]}_LIT:{lit[1]}>", lit[1])
    return code


def ref_sari_ngram(s, c, rs, numref):
    r = Counter(g for grams in rs for g in grams)
    s_rep = Counter({g: n * numref for g, n in Counter(s).items()})
    c_rep = Counter({g: n * numref for g, n in Counter(c).items()})
    keep, keep_good, keep_all = s_rep & c_rep, (s_rep & c_rep) & r, s_rep & r
    kp = sum(keep_good[g] / keep[g] for g in keep_good) / len(keep) if keep else 1
    kr = sum(keep_good.values()) / sum(keep_all.values()) if keep_all else 1
    keep_f = 2 * kp * kr / (kp + kr) if kp > 0 or kr > 0 else 0
    dele = s_rep - c_rep
    dele_good = dele - r
    dp = sum(dele_good[g] / dele[g] for g in dele_good) / len(dele) if dele else 1
    add = set(c) - set(s)
    good = add & set(r)
    add_all = set(r) - set(s)
    ap = len(good) / len(add) if add else 1
    ar = len(good) / len(add_all) if add_all else 1
    add_f = 2 * ap * ar / (ap + ar) if ap > 0 or ar > 0 else 0
    return keep_f, dp, add_f


def ref_sari(sources, predictions, references):
    norm = lambda t: Tokenizer13a()(t.lower())  # noqa: E731
    grams = lambda toks, n: [" ".join(toks[i : i + n]) for i in range(len(toks) - n + 1)]  # noqa: E731
    scores = []
    for src, pred, refs in zip(sources, predictions, references):
        s, c, rs = norm(src).split(" "), norm(pred).split(" "), [norm(r).split(" ") for r in refs]
        parts = [ref_sari_ngram(grams(s, n), grams(c, n), [grams(x, n) for x in rs], len(rs)) for n in range(1, 5)]
        scores.append(sum(sum(p[k] for p in parts) / 4 for k in range(3)) / 3)
    return 100.0 * sum(scores) / len(scores)


# --- the comparisons ---------------------------------------------------------------------------------
def test_accuracy_is_raw_exact_match_skipping_empty_pairs_over_all():
    expected = 100.0 * trace_mean(lambda p, t: float(p == t), PREDICTIONS, ANSWERS)
    assert trace_accuracy(PREDICTIONS, ANSWERS) == pytest.approx(expected, abs=1e-9)
    assert trace_accuracy([" A"], ["A"]) == 0.0 and METRICS["accuracy"]([" A"], ["A"]) == 100.0  # no strip


def test_scienceqa_compares_the_first_raw_character():
    preds, answers = ["B\nBecause ...", " A", "", "C"], ["B\nsince", "A", "A", "D"]
    expected = 100.0 * trace_mean(lambda p, t: float(p == t), [p[:1] for p in preds], [a[:1] for a in answers])
    assert trace_first_char_accuracy(preds, answers) == pytest.approx(expected, abs=1e-9) == 25.0


def test_rouge_l_is_the_rouge_packages_on_multi_sentence_and_german_text():
    preds, answers = PREDICTIONS[2:5], ANSWERS[2:5]
    expected = 100.0 * trace_mean(ref_rouge, preds, answers)
    assert trace_rouge_l(preds, answers) == pytest.approx(expected, abs=1e-9)
    assert trace_rouge_l(["..."], ["a summary"]) == 0.0  # rouge refuses a prediction without words: counted 0


def test_edit_similarity_replaces_py150_literals_then_uses_fuzzywuzzy():
    preds = ["return <STR_LIT:hello> + x", "x = <NUM_LIT>", "c = <CHAR_LIT>", "", "y = 1"]
    answers = ["return hello + x", "x = 0", "c = ", "z", "y  = 1 "]
    expected = trace_mean(fuzz.ratio, [ref_postprocess(p) for p in preds], [ref_postprocess(a) for a in answers])
    assert trace_edit_similarity(preds, answers) == pytest.approx(expected, abs=1e-9)
    assert py150_postprocess("f(<STR_LIT:a b>, <NUM_LIT:3>, <CHAR_LIT>)") == "f(a b, 3, )"
    assert all(float(fuzz.ratio(p, a)).is_integer() for p, a in zip(preds, answers))  # an integer per pair


def test_sari_is_hugging_faces_on_13a_tokens_counting_every_pair():
    sources = ["About 95 species are currently accepted .", "Der Arzt beobachtete zahlreiche Kinder.", "Ein Satz."]
    preds = ["About 95 you now get in .", "Der Arzt sah viele Kinder.", ""]
    refs = [
        [
            "About 95 species are currently known .",
            "About 95 species are now accepted .",
            "95 species are now accepted .",
        ],
        ["Der Doktor sah viele Kinder."],
        ["Ein Satz."],
    ]
    got = trace_sari(preds, [r[0] for r in refs], sources)
    assert got == pytest.approx(ref_sari(sources, preds, [[r[0]] for r in refs]), abs=1e-9)
    # the Hugging Face metric's own documented example (three references)
    assert ref_sari(sources[:1], preds[:1], refs[:1]) == pytest.approx(26.953601953601954, abs=1e-9)
    from cl_bench.evaluation.sari import sari

    assert sari(sources[:1], preds[:1], refs[:1], tokenizer="13a") == pytest.approx(26.953601953601954, abs=1e-9)


def test_fuzzywuzzy_runs_on_difflib_as_in_traces_requirements():
    import difflib

    assert fuzz.SequenceMatcher is difflib.SequenceMatcher  # python-Levenshtein would change the ratios


def test_trace_scoring_sees_the_answer_exactly_as_decoded(monkeypatch):
    from cl_bench.data.tasks import Example
    from cl_bench.evaluation.generation import GenerationConfig, generate
    from cl_bench.models import tiny_llama

    bundle = tiny_llama()
    calls = []

    def decode(ids, **kwargs):
        calls.append(kwargs)
        return [" B \n"] * len(ids)

    monkeypatch.setattr(bundle.tokenizer, "batch_decode", decode)
    examples = [Example("q? Answer:", "B")]
    assert generate(bundle.model, bundle.tokenizer, examples, 2, GenerationConfig(raw=True)) == [" B \n"]
    assert calls[-1] == {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
    assert generate(bundle.model, bundle.tokenizer, examples, 2, GenerationConfig()) == ["B"]
