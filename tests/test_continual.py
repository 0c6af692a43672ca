"""Continual evaluation: the worst-case metrics on hand-made curves, the settings' checks, and the
evaluator inside a real (tiny) run."""
import json
import random
from pathlib import Path

import pytest
import torch

from cl_bench.models import build_model
from cl_bench.data.loaders import TaskLoaders
from cl_bench.errors import ConfigError
from cl_bench.evaluation.continual import ContinualSettings, mean_answer_log_likelihood
from cl_bench.evaluation.continual_metrics import (avg_min_acc, continual_metrics, max_drop, min_acc, wc_acc,
                                                   windowed_forgetting)
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
    # w = 2 (adjacent evaluations): a falls 15 at most, b 20; w = 3: a falls 60 -> 30
    assert windowed_forgetting(STEPS, TRAINING, SCORES, NAMES, 2) == (17.5, {"a": 15, "b": 20, "c": 0})
    assert windowed_forgetting(STEPS, TRAINING, SCORES, NAMES, 3) == (25, {"a": 30, "b": 20, "c": 0})
    metrics = continual_metrics(STEPS, TRAINING, SCORES, NAMES, windows=(2, 3))
    assert metrics["wf2"] == 17.5 and metrics["wf3"] == 25 and metrics["avg_min_acc"] == 40


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


@pytest.mark.parametrize("node, message", [
    ({"every_n_steps": 0}, "eval.continual.every_n_steps must be an integer >= 1"),
    ({"every_n_steps": 2, "measure": "bleu"}, "eval.continual.measure must be one of"),
    ({"every_n_steps": 2, "measures": {"nope": "metric"}}, "eval.continual.measures.nope: no task 'nope'"),
    ({"every_n_steps": 2, "measures": {"a": "exact"}}, "eval.continual.measures.a must be one of"),
    ({"every_n_steps": 2, "windows": [1]}, "eval.continual.windows must be an integer >= 2"),
    ({"every_n_steps": 2, "max_examples": 0}, "eval.continual.max_examples must be an integer >= 1"),
    ({"every_n_step": 2}, "eval.continual has no key 'every_n_step'"),
])
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
    cfg = make_config(order, "eval.continual.every_n_steps=2", "eval.continual.max_examples=6",
                      "eval.continual.measures={sentiment: metric}")
    run(cfg, cfg.paths.output_dir)
    out = Path(cfg.paths.output_dir)
    res = json.loads((out / "results.json").read_text())
    curves = res["continual"]
    assert curves["steps"] == [2, 3, 5, 6, 8, 9] and curves["training"] == [0, 0, 1, 1, 2, 2]
    assert all(s > 0 for s in curves["seconds"]) and res["timings"]["continual_s"] == pytest.approx(sum(curves["seconds"]), abs=0.01)
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
    from cl_bench.config import build_stream
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
