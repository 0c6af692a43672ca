"""SARI (Xu et al. 2016, "Optimizing Statistical Machine Translation for Text Simplification", TACL).

For n = 1..4, with source S, prediction C and references R_1..R_k (n-gram counts; reference counts
summed over the k references, source and prediction counts multiplied by k):

    keep_n = F1 of the n-grams kept (in S and C), scored against those kept by the references,
    del_n  = precision of the n-grams deleted (in S, not in C) that the references also delete,
    add_n  = F1 of the n-grams added (in C, not in S) against those the references add,

    SARI = (mean_n keep_n + mean_n del_n + mean_n add_n) / 3.

Deletion uses precision only, as in the paper's reference implementation. Two variants:
``"paper"``, as the authors' script computes it (the values printed in the paper: 0.2683 on its
first example; 0/0 counts as 0), and ``"corrected"`` (default), as tensor2tensor's ``sari_hook``
and Hugging Face ``evaluate`` compute it: count-weighted keep recall (0.2695 on the same example)
and 0/0 counted as 1, so an output equal to source and reference scores 1. Text is lower-cased
and split into words and punctuation marks (``tokenizer="words"``), or, as Hugging Face's ``sari``
metric does (``tokenizer="13a"``, TRACE's scorer), tokenized by sacrebleu's 13a tokenizer and split
on single spaces (so an empty text is one empty token). Sentences are scored one by one and
averaged over the corpus, on a 0-100 scale.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)
KEEP_RECALL = ("corrected", "paper")
TOKENIZERS = ("words", "13a")


def normalize(text: str, tokenizer: str = "words") -> list[str]:
    """Lower-case and tokenize: words and punctuation marks, or sacrebleu's 13a (see module doc)."""
    if tokenizer == "13a":  # imported here: sacrebleu adds 0.3 s to every run's start otherwise
        from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

        return Tokenizer13a()(text.lower()).split(" ")
    return _TOKEN.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _ratio(num: float, den: float, empty: float) -> float:
    return num / den if den else empty


def _ngram_scores(
    source: list, prediction: list, references: list[list], keep_recall: str
) -> tuple[float, float, float]:
    """(keep F1, deletion precision, addition F1) for one n-gram order."""
    empty = 1.0 if keep_recall == "corrected" else 0.0  # the value of 0/0
    k = len(references)
    ref = Counter(g for r in references for g in r)
    src = Counter({g: c * k for g, c in Counter(source).items()})
    pred = Counter({g: c * k for g, c in Counter(prediction).items()})

    kept = src & pred
    kept_good = kept & ref
    kept_all = src & ref
    keep_p = _ratio(sum(kept_good[g] / kept[g] for g in kept_good), len(kept), empty)
    if keep_recall == "paper":
        keep_r = _ratio(sum(kept_good[g] / kept_all[g] for g in kept_good), len(kept_all), empty)
    else:
        keep_r = _ratio(sum(kept_good.values()), sum(kept_all.values()), empty)

    deleted = src - pred
    deleted_good = deleted - ref
    del_p = _ratio(sum(deleted_good[g] / deleted[g] for g in deleted_good), len(deleted), empty)

    added = set(pred) - set(src)
    added_good = added & set(ref)
    added_all = set(ref) - set(src)
    add_p = _ratio(len(added_good), len(added), empty)
    add_r = _ratio(len(added_good), len(added_all), empty)
    return _f1(keep_p, keep_r), del_p, _f1(add_p, add_r)


def sari_sentence(
    source: str, prediction: str, references: Sequence[str], keep_recall: str = "corrected", tokenizer: str = "words"
) -> float:
    """SARI of one prediction, in [0, 1]."""
    if not references:
        raise ValueError("SARI needs at least one reference")
    if keep_recall not in KEEP_RECALL:
        raise ValueError(f"keep_recall must be one of {KEEP_RECALL}, got {keep_recall!r}")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    s, c = normalize(source, tokenizer), normalize(prediction, tokenizer)
    rs = [normalize(r, tokenizer) for r in references]
    keep = dele = add = 0.0
    for n in range(1, 5):
        kn, dn, an = _ngram_scores(_ngrams(s, n), _ngrams(c, n), [_ngrams(r, n) for r in rs], keep_recall)
        keep, dele, add = keep + kn, dele + dn, add + an
    return (keep + dele + add) / 12


def sari(
    sources: Sequence[str],
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    keep_recall: str = "corrected",
    tokenizer: str = "words",
) -> float:
    """Corpus SARI on 0-100: the mean of sentence scores."""
    if not (len(sources) == len(predictions) == len(references)):
        raise ValueError("sources, predictions and references must have the same length")
    if not predictions:
        return 0.0
    total = sum(sari_sentence(s, p, r, keep_recall, tokenizer) for s, p, r in zip(sources, predictions, references))
    return 100.0 * total / len(predictions)
