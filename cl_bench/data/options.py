"""How many answer options a task offers (k, whose chance accuracy 1/k per-example forgetting
discounts): from its prompts where they list the options (:func:`declared_options`), else from the
distinct answers of a classification task's split (:func:`answer_options`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def answer_options(answers: Sequence[str], limit: int = 20) -> int | None:
    """k for a classification task: how many distinct answers its split has (at most ``limit``, and
    fewer than its examples); None for a task whose answers are free text."""
    distinct = len(set(answers))
    return distinct if 1 < distinct <= limit and distinct < len(answers) else None


#: O-LoRA's options line, "Option: label, label, ... " (cl_bench/data/cl_benchmark.py, from labels.json)
_OPTION_LINE = re.compile(r"^Option: (.*?) *$", re.MULTILINE)
#: a lettered choice line: "A. text" (the embedded sentiment task, TRACE's ScienceQA), "A: text"
#: (COPA), "A) text" or "(A) text"
_CHOICE_LINE = re.compile(r"\(?([A-Z])[.:)]\s")


def prompt_options(prompt: str) -> int | None:
    """How many answer options one prompt offers: the labels of O-LoRA's "Option: a, b, c" line, or
    its lettered choice lines counted from "A" while the letters follow one another on consecutive
    lines; None when it offers fewer than two."""
    line = _OPTION_LINE.search(prompt)
    if line:
        count = len(line.group(1).split(", "))
        return count if count > 1 else None
    lines = prompt.splitlines()
    for start, text in enumerate(lines):
        if (m := _CHOICE_LINE.match(text)) is None or m.group(1) != "A":
            continue
        count = 1
        while start + count < len(lines) and (m := _CHOICE_LINE.match(lines[start + count])):
            if m.group(1) != chr(ord("A") + count):
                break
            count += 1
        if count > 1:
            return count
    return None


def declared_options(prompts: Sequence[str]) -> int | float | None:
    """k for a task whose prompts offer its answer options (:func:`prompt_options`), whatever answers
    a subset of its examples happens to hold: the number every prompt offers, or, where it varies from
    prompt to prompt (ScienceQA: 2 to 5 choices), their harmonic mean, whose chance accuracy 1/k is
    the prompts' mean; None unless every prompt offers options."""
    counts = [prompt_options(p) for p in prompts]
    if not counts or None in counts:
        return None
    if len(set(counts)) == 1:
        return counts[0]
    return len(counts) / sum(1 / k for k in counts)
