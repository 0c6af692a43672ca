import pytest

from cl_bench.evaluation.metrics import METRICS, accuracy, edit_similarity, first_letter_accuracy, rouge_l, sari_metric


def test_accuracy_is_exact_match_after_strip():
    assert accuracy([" A", "B", "C."], ["A", "B ", "C"]) == pytest.approx(200 / 3)
    assert accuracy([], []) == 0.0


@pytest.mark.parametrize("metric", [accuracy, first_letter_accuracy, edit_similarity, rouge_l])
def test_empty_prediction_or_reference_scores_zero_as_in_trace(metric):
    # TRACE skips such pairs but divides by all examples; the libraries call "" == "" a match
    assert metric(["", "x", "  "], ["", "", "x"]) == 0.0
    assert metric(["x", ""], ["x", "x"]) == pytest.approx(50.0)


def test_first_letter_accuracy_compares_the_option_letter_and_never_matches_empty():
    assert first_letter_accuracy(["A. dovish", "b", "", "C"], ["A", "B", "", "C"]) == 50.0


def test_rouge_l_f_measure():
    # LCS("the cat sat", "the cat sat down") = 3 -> P = 1, R = 3/4, F = 6/7
    assert rouge_l(["the cat sat"], ["the cat sat down"]) == pytest.approx(100 * 6 / 7)
    assert rouge_l([""], ["anything"]) == 0.0


def test_edit_similarity_is_fuzz_ratio():
    # Indel distance("abc", "abd") = 2 over 6 characters -> 1 - 2/6
    assert edit_similarity(["abc"], ["abd"]) == pytest.approx(100 * 4 / 6)
    assert edit_similarity(["  x = 1"], ["x = 1"]) == 100.0


def test_sari_metric_uses_the_prompt_as_source():
    prompt = "About 95 species are currently accepted ."
    assert sari_metric(
        ["About 95 species are now accepted ."], ["About 95 species are now accepted ."], [prompt]
    ) == pytest.approx(100.0)


def test_registry_names():
    project = {
        "accuracy",
        "first_letter_accuracy",
        "rouge_l",
        "edit_similarity",
        "sari",
        "exact_match",
        "rouge_l_stemmed",
    }
    trace = {"trace_accuracy", "trace_first_char_accuracy", "trace_rouge_l", "trace_edit_similarity", "trace_sari"}
    assert set(METRICS) == project | trace
