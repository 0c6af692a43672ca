"""Per-example forgetting and backward transfer against a restatement of the paper's released code
(post-forget/post-forget, src/analyze/create_csv.py), and through a run on the tiny model."""

import json
import random
from pathlib import Path

import pytest

from cl_bench.data.cl_benchmark import olora_examples
from cl_bench.data.mini_stream import GENERATORS
from cl_bench.data.options import answer_options, declared_options, prompt_options
from cl_bench.data.tasks import Example, Task, TaskSpec, TaskStream
from cl_bench.evaluation.example_forgetting import example_flips, flips, right_answers, stream_options
from cl_bench.evaluation.metrics import METRICS
from cl_bench.recording.results import RunRecorder


def reference(before, after, k):
    """create_csv.py: counts of the four transitions, then the absolute, adjusted and ceiling columns."""
    n = len(before)
    t = {(b, a): sum(x == b and y == a for x, y in zip(before, after)) for b in (0, 1) for a in (0, 1)}
    acc_before, acc_after = (t[1, 0] + t[1, 1]) / n, (t[0, 1] + t[1, 1]) / n
    adjustment = ((1 - acc_before) * (1 - acc_after)) / (k - 1)
    forget, improve = t[1, 0] / n, t[0, 1] / n
    return {
        "forgotten": forget,
        "gained": improve,
        "forgotten_beyond_chance": max(forget - adjustment, 0),
        "gained_beyond_chance": max(improve - adjustment, 0),
        "max_forgotten": max((k * acc_before - 1) / (k - 1), 0),
        "max_gained": max((k * acc_after - 1) / (k - 1), 0),
    }


@pytest.mark.parametrize(
    "before, after, k",
    [
        ([1, 1, 1, 1, 0, 0, 1, 0, 1, 1], [1, 0, 0, 1, 1, 0, 1, 0, 0, 1], 4),
        ([1, 0, 1, 0], [0, 1, 0, 1], 2),  # two coin flips: all of it chance
        ([0, 0, 0], [0, 0, 1], 3),
    ],
)
def test_flips_equal_the_released_code(before, after, k):
    got = flips([bool(b) for b in before], [bool(a) for a in after], k)
    assert {key: got[key] for key in reference(before, after, k)} == pytest.approx(reference(before, after, k))
    assert got["right_after"] - got["right_before"] == pytest.approx(got["gained"] - got["forgotten"])
    plain = flips([bool(b) for b in before], [bool(a) for a in after], None)
    assert plain["forgotten_beyond_chance"] is None and plain["forgotten"] == got["forgotten"]
    with pytest.raises(ValueError, match="must align"):
        flips([True], [True, False])


def test_what_counts_as_right_and_how_many_options():
    assert right_answers("accuracy", METRICS["accuracy"], ["a", "b "], ["a", "c"], ["", ""], 10) == [True, False]
    rouge = METRICS["rouge_l"]
    predictions, answers = ["the cat sat", "a dog ran far away"], ["the cat sat down", "cats sleep"]
    scores = [rouge([p], [a], [""]) for p, a in zip(predictions, answers)]
    assert (
        right_answers("rouge_l", rouge, predictions, answers, ["", ""], 50)
        == [s >= 50 for s in scores]
        == [True, False]
    )
    assert answer_options(["pos", "neg", "pos", "neg"]) == 2 and answer_options(["x", "y", "z"]) is None


def test_a_run_records_each_trained_task_s_flips_from_its_predictions(make_config):
    from cl_bench.run_config import build_stream
    from cl_bench.stream_run import run

    cfg = make_config("tasks.order=[arith,sentiment,code]")
    recorder = run(cfg, cfg.paths.output_dir)
    results = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    folder = Path(cfg.paths.output_dir) / "predictions"
    final = json.loads((folder / "after_code.json").read_text())
    assert sorted(results["example_forgetting"]) == ["arith", "sentiment"]  # code has no later stage
    options = stream_options(build_stream(cfg.tasks), cfg.eval.split, cfg.eval.max_examples)
    assert options["sentiment"] == 3  # its prompts' "A. positive / B. negative / C. neutral"
    for task in ("arith", "sentiment"):
        then = json.loads((folder / f"after_{task}.json").read_text())[task]
        expected = flips([r["right"] for r in then], [r["right"] for r in final[task]], options[task])
        assert results["example_forgetting"][task] == pytest.approx(expected)
        scores = recorder.R[recorder.stages.index(f"after_{task}")][recorder.task_names.index(task)]
        if recorder.metric_names[recorder.task_names.index(task)] == "accuracy":  # right = the score's examples
            assert 100 * expected["right_before"] == pytest.approx(scores)
    # the loggers get each task's flips and their means (beyond chance where a task has options)
    logged = recorder.stage_metrics()
    flipped = results["example_forgetting"]
    for task, f in flipped.items():
        assert (
            logged[f"examples/{task}/forgotten"] == f["forgotten"] and logged[f"examples/{task}/gained"] == f["gained"]
        )
    adjusted = [f["forgotten"] if f["options"] is None else f["forgotten_beyond_chance"] for f in flipped.values()]
    assert logged["cl/ex_forgotten"] == pytest.approx(100 * sum(adjusted) / len(adjusted))


def test_a_run_s_flip_summary_uses_chance_adjustment_only_where_a_task_has_options():
    per_task = {
        "cls": flips([True, True, False, False], [False, True, True, False], 2),
        "gen": flips([True, True, False, False], [False, False, True, False], None),
    }
    # cls: F 1/4, BT 1/4, chance (1/2)(1/2)/1 = 1/4: nothing beyond chance; gen: F 2/4, BT 1/4 raw
    assert example_flips(per_task) == pytest.approx(
        {"ex_forgotten": 100 * (0 + 0.5) / 2, "ex_gained": 100 * (0 + 0.25) / 2}
    )
    assert example_flips({}) == {"ex_forgotten": None, "ex_gained": None}


def choice_prompt(i: int, letters: str = "ABCD") -> str:
    return f"Question {i}?\nChoices:\n" + "".join(f"{c}. option {c.lower()}\n" for c in letters) + "Answer:"


def test_a_subsample_without_a_label_keeps_the_task_s_own_number_of_options(tmp_path):
    """A 4-option task whose first 16 test examples (those evaluated) hold no "D": its k is 4, from
    its prompts, where the distinct answers of the 16 would give 3 (F beyond chance 13.3%, not 17.2%)."""
    answers = ["ABC"[i % 3] for i in range(16)] + ["D"] * 4
    test = [Example(choice_prompt(i), a) for i, a in enumerate(answers)]
    mc = Task(TaskSpec("mc", "accuracy", 2), {"train": test, "test": test}, epochs=1)
    other = Task(TaskSpec("other", "rouge_l", 8), {"train": test, "test": test}, epochs=1)
    options = stream_options(TaskStream([mc, other]), "test", 16)
    assert options["mc"] == 4 and answer_options(answers[:16]) == 3
    before = [True] * 10 + [False] * 6  # a_pre 10/16; 4 of them forgotten, none gained: a_post 6/16
    after = [False] * 4 + [True] * 6 + [False] * 6
    recorder = RunRecorder(tmp_path, {}, ["mc", "other"], ["accuracy", "rouge_l"], options=options)
    for stage, right in (("after_mc", before), ("after_other", after)):
        records = [{"answer": a, "prediction": a, "right": r} for a, r in zip(answers, right)]
        (tmp_path / "predictions").mkdir(exist_ok=True)
        (tmp_path / "predictions" / f"{stage}.json").write_text(json.dumps({"mc": records}))
    for _ in range(3):
        recorder.add_row([0.0, 0.0], 0.0)
    got = recorder.example_forgetting()["mc"]
    expected = reference([int(b) for b in before], [int(a) for a in after], 4)
    assert {key: got[key] for key in expected} == pytest.approx(expected)
    assert got["options"] == 4 and got["forgotten_beyond_chance"] == pytest.approx(0.171875)


def test_the_options_a_task_s_prompts_offer(tmp_path):
    # O-LoRA's "Option: ..." line, as the loader writes it from labels.json
    folder = tmp_path / "TC" / "agnews"
    folder.mkdir(parents=True)
    labels = ["World", "Sports", "Business", "Science or Technology"]
    (folder / "labels.json").write_text(json.dumps(labels))
    (folder / "test.json").write_text(json.dumps([{"sentence": "A. Title: x\nB. y", "label": "Sports"}]))
    (olora,) = olora_examples(folder / "test.json", "agnews", {"TC": "What is the topic? Choose one.\n"})
    assert prompt_options(olora.prompt) == 4  # the sentence's own lines are not the options
    # the embedded stream's sentiment task; COPA's "A: ..." lines; a lettered run that stops at a gap
    sentiment = GENERATORS["sentiment"][0](random.Random(0)).prompt
    assert prompt_options(sentiment) == 3
    assert prompt_options("Which is the cause? Choose one between A and B.\nA: rain\nB: sun\nAnswer:") == 2
    assert prompt_options("A. one\nC. three\nAnswer:") is None and prompt_options("Solve 2 + 2.\nAnswer:") is None
    # ScienceQA's choices vary by question: the harmonic mean, whose chance accuracy is the mean one
    assert declared_options([choice_prompt(0, "AB"), choice_prompt(1, "ABCD")]) == pytest.approx(
        1 / ((1 / 2 + 1 / 4) / 2)
    )
    assert declared_options([choice_prompt(0), "Solve 2 + 2.\nAnswer:"]) is None  # not every prompt offers them
    # a free-text task whose prompts only look like choices (a dialogue) is not adjusted by them
    dialogue = [Example(f"A: hello {i}\nB: hi\nReply:", f"reply {i}") for i in range(4)]
    chat = Task(TaskSpec("chat", "rouge_l", 8), {"test": dialogue}, epochs=1)
    assert stream_options(TaskStream([chat]), "test", None) == {"chat": None}
