"""Continual evaluation: the worst-case metrics on hand-made curves, the settings' checks, and the
evaluator inside a real (tiny) run."""

import json
import random
from pathlib import Path

import pytest
import torch

from cl_bench.data.loaders import TaskLoaders
from cl_bench.errors import ConfigError
from cl_bench.evaluation.continual import ContinualSettings, mean_answer_log_likelihood
from cl_bench.evaluation.stability_gap import (
    avg_min_acc,
    continual_metrics,
    max_drop,
    min_acc,
    wc_acc,
    windowed_forgetting,
)
from cl_bench.models import build_model
from cl_bench.stream_run import run

NAMES = ["a", "b", "c"]
STEPS = [2, 4, 6, 8, 10, 12]
TRAINING = [0, 0, 1, 1, 2, 2]
SCORES = {"a": [50, 60, 45, 30, 55, 40], "b": [None, None, 20, 70, 50, 65], "c": [None, None, None, None, 10, 80]}


def test_min_acc_takes_only_the_points_after_a_task_s_training():
    # a: points 2..5 (training 1 and 2) -> 30; b: points 4..5 -> 50; c is still in training
    assert min_acc(STEPS, TRAINING, SCORES, NAMES) == {"a": 30, "b": 50, "c": None}
    assert avg_min_acc(STEPS, TRAINING, SCORES, NAMES) == 40


def test_wc_acc_weighs_the_last_task_by_one_over_k():
    # k = 3: (1/3) * 80 (c at its last point) + (2/3) * 40
    assert wc_acc(STEPS, TRAINING, SCORES, NAMES) == pytest.approx(80 / 3 + 2 / 3 * 40)
    # after the first task only: its own final score
    assert wc_acc(STEPS[:2], TRAINING[:2], {k: v[:2] for k, v in SCORES.items()}, NAMES) == 60


def test_windowed_forgetting_is_the_largest_fall_within_w_evaluations():
    # w = 2 (adjacent evaluations): a falls 15 at most, b 20, c (in training) 0; averaged over all
    # three, as the authors' TaskAveragingPluginMetric does; w = 3: a falls 60 -> 30
    assert windowed_forgetting(STEPS, TRAINING, SCORES, NAMES, 2) == (pytest.approx(35 / 3), {"a": 15, "b": 20, "c": 0})
    assert windowed_forgetting(STEPS, TRAINING, SCORES, NAMES, 3) == (pytest.approx(50 / 3), {"a": 30, "b": 20, "c": 0})
    metrics = continual_metrics(STEPS, TRAINING, SCORES, NAMES, windows=(2, 3))
    assert metrics["wf2"] == pytest.approx(11.6667, abs=1e-4) and metrics["avg_min_acc"] == 40


def _authors_average_windowed_forgetting(steps, training, scores, names, window):
    """Mattdl/ContinualEvaluation's rule, restated: per task a deque of its last ``window``
    accuracies (never reset), after every evaluation max_forgetting[t] = max(itself, max over i < j
    in the deque of A_i - A_j), starting at 0 (WindowedForgettingPluginMetric); the reported value
    is the plain mean over every task evaluated so far (TaskAveragingPluginMetric), taken after the
    last evaluation."""
    from collections import deque

    windows, worst = {}, {}
    for p in range(len(steps)):
        for name in names:
            if scores[name][p] is None:
                continue
            d = windows.setdefault(name, deque(maxlen=window))
            d.append(scores[name][p])
            drops = [d[i] - d[j] for i in range(len(d)) for j in range(i + 1, len(d))]
            worst[name] = max([worst.get(name, 0.0)] + drops)
    return sum(worst.values()) / len(worst) if worst else None


def test_windowed_forgetting_equals_the_authors_rule_on_random_curves():
    rng = random.Random(3)
    for _ in range(300):
        tasks = rng.randint(1, 4)
        names = [f"t{i}" for i in range(tasks)]
        per_task = [rng.randint(1, 5) for _ in range(tasks)]
        training = [t for t in range(tasks) for _ in range(per_task[t])][: rng.randint(1, sum(per_task))]
        steps = list(range(1, len(training) + 1))
        scores = {n: [rng.uniform(0, 100) if t >= i else None for t in training] for i, n in enumerate(names)}
        w = rng.randint(2, 6)
        got = windowed_forgetting(steps, training, scores, names, w)[0]
        assert got == pytest.approx(_authors_average_windowed_forgetting(steps, training, scores, names, w))


def test_max_drop_equals_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        values = [rng.uniform(0, 100) for _ in range(rng.randint(1, 12))]
        w = rng.randint(2, 6)
        brute = max([0.0] + [values[p] - values[q] for q in range(len(values)) for p in range(q) if q - p < w])
        assert max_drop(values, w) == brute


def test_bad_curves_are_refused():
    with pytest.raises(ValueError, match="one entry per point"):
        min_acc([1, 2], [0], {"a": [1, 2]}, ["a"])
    with pytest.raises(ValueError, match="stream order"):
        min_acc([1, 2], [1, 0], {"a": [1, 2]}, ["a"])
    with pytest.raises(ValueError, match="at least 2"):
        max_drop([1, 2], 1)


@pytest.mark.parametrize(
    "node, message",
    [
        ({"every_n_steps": 0}, "eval.continual.every_n_steps must be an integer >= 1"),
        ({"every_n_steps": 2, "measure": "bleu"}, "eval.continual.measure must be one of"),
        ({"every_n_steps": 2, "measures": {"nope": "metric"}}, "eval.continual.measures.nope: no task 'nope'"),
        ({"every_n_steps": 2, "measures": {"a": "exact"}}, "eval.continual.measures.a must be one of"),
        ({"every_n_steps": 2, "windows": [1]}, "eval.continual.windows must be an integer >= 2"),
        ({"every_n_steps": 2, "max_examples": 0}, "eval.continual.max_examples must be an integer >= 1"),
        ({"every_n_step": 2}, "eval.continual has no key 'every_n_step'"),
        ({"every_n_steps": 2, "resample": "maybe"}, "eval.continual.resample must be true or false, got 'maybe'"),
    ],
)
def test_bad_settings_are_refused_by_key(node, message):
    with pytest.raises(ConfigError, match=message):
        ContinualSettings.from_config(node, ["a", "b"])


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    newest = sorted((run_dir / "checkpoints").glob("stage-*.pt"))[-1]
    return torch.load(newest, weights_only=True)["model"]


def test_a_run_records_curves_that_match_the_stage_scores_and_leave_training_unchanged(make_config, tmp_path):
    """3 tasks x 3 steps, every 2 steps: points at steps 2, 3 | 5, 6 | 8, 9. The sentiment task is
    scored with its metric on the stage evaluation's examples, so at each task's end its point
    equals that stage's R entry; the others' log-likelihood at the end equals a direct computation
    on the final weights; and the run trains bitwise as one without continual evaluation."""
    order = "tasks.order=[sentiment,arith,minutes]"
    cfg = make_config(
        order,
        "eval.continual.every_n_steps=2",
        "eval.continual.max_examples=6",
        "eval.continual.measures={sentiment: metric}",
    )
    run(cfg, cfg.paths.output_dir)
    out = Path(cfg.paths.output_dir)
    res = json.loads((out / "results.json").read_text())
    curves = res["continual"]
    assert curves["steps"] == [2, 3, 5, 6, 8, 9] and curves["training"] == [0, 0, 1, 1, 2, 2]
    assert all(s > 0 for s in curves["seconds"]) and res["timings"]["continual_s"] == pytest.approx(
        sum(curves["seconds"]), abs=0.01
    )
    assert curves["measures"] == {"sentiment": "metric", "arith": "loglik", "minutes": "loglik"}
    assert [v is None for v in curves["scores"]["minutes"]] == [True] * 4 + [False] * 2
    ends = [1, 3, 5]
    assert [curves["scores"]["sentiment"][p] for p in ends] == [row[0] for row in res["R"][1:]]
    # mixed measures: per-task values only
    assert res["continual_metrics"]["avg_min_acc"] is None and res["continual_metrics"]["min_acc"]["arith"] is not None

    bundle = build_model(cfg.model)
    bundle.model.load_state_dict(_final_weights(out))
    bundle.model.eval()
    loaders = TaskLoaders.from_config(cfg.train, bundle.tokenizer)
    from cl_bench.run_config import build_stream

    stream = {t.name: t for t in build_stream(cfg.tasks)}
    for name in ("arith", "minutes"):
        direct = mean_answer_log_likelihood(bundle.model, loaders.passes(stream[name].splits["test"][:6]), "cpu")
        assert curves["scores"][name][-1] == pytest.approx(direct, rel=1e-6)

    plain = make_config(order)
    with_out = tmp_path / "plain"
    run(plain, with_out)
    assert json.loads((with_out / "results.json").read_text())["R"] == res["R"]
    final, reference = _final_weights(out), _final_weights(with_out)
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_the_authors_options_a_point_before_the_first_update_and_a_subsample_drawn_per_evaluation(make_config):
    """Issue 24.4: ``before_first_step`` adds the authors' x = -1 point (step 0, the first task only),
    which enters its forgetting window; ``resample`` scores each evaluation on its own seeded draw."""
    cfg = make_config(
        "tasks.order=[arith,minutes]",
        "tasks.max_steps=2",
        "eval.continual.every_n_steps=2",
        "eval.continual.max_examples=3",
        "eval.continual.before_first_step=true",
        "eval.continual.resample=true",
    )
    run(cfg, cfg.paths.output_dir)
    res = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    curves = res["continual"]
    assert curves["steps"] == [0, 2, 4] and curves["training"] == [0, 0, 1]
    assert curves["before_first_step"] is True and curves["resample"] is True
    arith = curves["scores"]["arith"]
    assert res["continual_metrics"]["wf10_per_task"]["arith"] == pytest.approx(max_drop(arith, 10))
    from cl_bench.evaluation.continual import ContinualEvaluator
    from cl_bench.models import tiny_llama
    from cl_bench.run_config import build_stream

    stream = build_stream(cfg.tasks)
    evaluator = ContinualEvaluator(
        ContinualSettings(2, 3, {"arith": "loglik", "minutes": "loglik"}, resample=True),
        stream,
        None,
        TaskLoaders(tiny_llama().tokenizer, 4, 64, 8),
        None,
        "test",
        seed=cfg.seed,
    )
    draws = [evaluator.subsample("arith", step).splits["test"] for step in (2, 4, 2)]
    assert draws[0] == draws[2] and draws[0] != draws[1]  # the same step draws the same examples
    assert all(len(set(d)) == 3 and set(d) <= set(stream[0].splits["test"]) for d in draws)
