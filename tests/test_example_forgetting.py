"""Per-example forgetting and backward transfer against a restatement of the paper's released code
(post-forget/post-forget, src/analyze/create_csv.py), and through a run on the tiny model."""

import json
from pathlib import Path

import pytest

from cl_bench.data.tasks import answer_options
from cl_bench.evaluation.example_forgetting import example_flips, flips, right_answers
from cl_bench.evaluation.metrics import METRICS


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
    from cl_bench.stream_run import run

    cfg = make_config("tasks.order=[arith,sentiment,code]")
    recorder = run(cfg, cfg.paths.output_dir)
    results = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    folder = Path(cfg.paths.output_dir) / "predictions"
    final = json.loads((folder / "after_code.json").read_text())
    assert sorted(results["example_forgetting"]) == ["arith", "sentiment"]  # code has no later stage
    for task in ("arith", "sentiment"):
        then = json.loads((folder / f"after_{task}.json").read_text())[task]
        expected = flips(
            [r["right"] for r in then], [r["right"] for r in final[task]], answer_options([r["answer"] for r in then])
        )
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
