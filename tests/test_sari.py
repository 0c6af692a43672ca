import pytest

from cl_bench.evaluation.sari import normalize, sari, sari_sentence

SOURCE = "About 95 species are currently accepted ."
REFS = [
    "About 95 species are currently known .",
    "About 95 species are now accepted .",
    "95 species are now accepted .",
]
OUTPUTS = ["About 95 you now get in .", "About 95 species are now agreed .", "About 95 species are currently agreed ."]


@pytest.mark.parametrize(
    "output, expected",
    # tensor2tensor's sari_hook tests (the values Hugging Face evaluate also gives)
    zip(OUTPUTS, [0.2695360, 0.6170966, 0.5088682]),
)
def test_corrected_keep_recall_matches_tensor2tensor(output, expected):
    assert sari_sentence(SOURCE, output, REFS) == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize(
    "output, expected",
    # the SARI paper's own script (EASSE's tests give the same numbers)
    zip(OUTPUTS, [0.26827824, 0.58899954, 0.50716089]),
)
def test_paper_keep_recall_matches_the_reference_script(output, expected):
    assert sari_sentence(SOURCE, output, REFS, keep_recall="paper") == pytest.approx(expected, abs=1e-7)


def test_identical_source_output_and_reference_score_one():
    # 0/0 counts as 1 in the corrected variant, as in tensor2tensor and HF evaluate
    assert sari_sentence("3 1 4 1 5 9 2 6 5", "3 1 4 1 5 9 2 6 5", ["3 1 4 1 5 9 2 6 5"]) == pytest.approx(1.0)
    assert sari_sentence("3 1 4 1 5 9 2 6 5", "3 1 4 1 80 70", ["3 1 4 1 80 70"]) == pytest.approx(1.0)
    # ... and as 0 in the paper's script: nothing deleted or added scores 0 on those two thirds
    assert sari_sentence("3 1 4 1 5", "3 1 4 1 5", ["3 1 4 1 5"], keep_recall="paper") == pytest.approx(1 / 3)


def test_corpus_sari_is_the_mean_of_sentences_on_0_100():
    score = sari([SOURCE, SOURCE], OUTPUTS[:2], [REFS, REFS])
    assert score == pytest.approx(100 * (0.2695360195 + 0.6170965608) / 2, abs=1e-6)


def test_normalisation_splits_punctuation_and_lowercases():
    assert normalize("About 95 species, currently accepted.") == [
        "about",
        "95",
        "species",
        ",",
        "currently",
        "accepted",
        ".",
    ]
    assert sari_sentence(
        "About 95 species are currently accepted.", "About 95 you now get in.", [r.replace(" .", ".") for r in REFS]
    ) == pytest.approx(0.2695360, abs=1e-7)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least one reference"):
        sari_sentence("a b", "a", [])
    with pytest.raises(ValueError, match="keep_recall"):
        sari_sentence("a b", "a", ["a"], keep_recall="other")
    with pytest.raises(ValueError, match="same length"):
        sari(["a"], ["a", "b"], [["a"]])
