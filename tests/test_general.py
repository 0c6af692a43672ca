"""General ability through lm-evaluation-harness: the offline probe, the harness path, delta R^G."""

import json
from collections import Counter

import pytest
import torch

from cl_bench.errors import ConfigError
from cl_bench.evaluation.general_ability import PROJECT_TASKS, GeneralAbility
from cl_bench.models import tiny_llama
from cl_bench.stream_run import run

PROBE = [json.loads(line) for line in (PROJECT_TASKS / "probe.jsonl").read_text().splitlines()]


def test_the_probe_is_280_well_formed_four_way_questions():
    assert len(PROBE) == 280 and len({p["question"] for p in PROBE}) == 280
    assert Counter(p["category"] for p in PROBE) == {"facts": 80, "arithmetic": 80, "reading": 70, "commonsense": 50}
    for p in PROBE:
        assert len(set(p["choices"])) == 4 and 0 <= p["answer"] < 4
    # the right answer is spread over the positions: a constant guess scores near chance
    assert max(Counter(p["answer"] for p in PROBE).values()) / len(PROBE) < 0.3


def _own_accuracy(model, tokenizer, items) -> float:
    """The harness's multiple-choice accuracy, recomputed here: the choice with the highest summed
    log-likelihood of " <choice>" after "Question: ...\\nAnswer:" (no BOS, as the harness encodes)."""
    model.eval()
    correct = 0
    for item in items:
        context = f"Question: {item['question']}\nAnswer:"
        scores = []
        for choice in item["choices"]:
            ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
            whole = torch.tensor([tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]])
            n = whole.shape[1] - len(ctx)
            with torch.no_grad():
                logp = model(input_ids=whole).logits.float().log_softmax(-1)[0, -n - 1 : -1]
            scores.append(logp.gather(-1, whole[0, -n:, None]).sum().item())
        correct += max(range(4), key=scores.__getitem__) == item["answer"]
    return 100.0 * correct / len(items)


def test_the_harness_scores_the_probe_as_recomputed_and_leaves_the_rngs_alone():
    bundle = tiny_llama(seed=1)
    general = GeneralAbility(tasks={"cl_bench_probe": "acc,none"}, limit=40, batch_size=8)
    general.check()
    torch.manual_seed(5)
    bundle.model.train()
    scores = general.evaluate(bundle.model, bundle.tokenizer)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))  # the harness reseeds; the run's generators are restored
    assert bundle.model.training
    assert scores == {"cl_bench_probe": pytest.approx(_own_accuracy(bundle.model, bundle.tokenizer, PROBE[:40]))}


@pytest.mark.parametrize(
    "tasks, message",
    [
        ({"no_such_benchmark": "acc,none"}, r"lm-eval does not know task\(s\) \['no_such_benchmark'\]"),
        ({"cl_bench_probe": ""}, "general.tasks.cl_bench_probe must name a metric"),
    ],
)
def test_bad_general_settings_are_refused(tasks, message):
    with pytest.raises(ConfigError, match=message):
        GeneralAbility(tasks=tasks).check()


def test_a_metric_the_results_lack_is_named():
    bundle = tiny_llama(seed=1)
    with pytest.raises(ConfigError, match="no metric 'f1,none'; they have .*'acc,none'"):
        GeneralAbility(tasks={"cl_bench_probe": "f1,none"}, limit=4).evaluate(bundle.model, bundle.tokenizer)


def test_a_run_reports_general_ability_before_and_after_with_delta(make_config, monkeypatch):
    cfg = make_config("general=probe", "general.limit=8", "tasks.order=[arith,code]")
    recorder = run(cfg, cfg.paths.output_dir)
    results = json.loads((recorder.out_dir / "results.json").read_text())
    scores = results["general"]["scores"]
    assert list(scores) == ["base", "after_code"]  # not after every task by default
    expected = scores["after_code"]["cl_bench_probe"] - scores["base"]["cl_bench_probe"]
    assert results["general"]["delta_RG"] == pytest.approx(expected)
    assert all(0 <= s[k] <= 100 for s in scores.values() for k in s)


def test_an_unknown_benchmark_stops_the_run_before_the_model_loads(make_config, monkeypatch):
    cfg = make_config("general=probe", "+general.tasks.nope='acc,none'")
    monkeypatch.setattr("cl_bench.models.tiny_llama", lambda **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match="lm-eval does not know"):
        run(cfg, cfg.paths.output_dir)


def test_traces_six_benchmarks_are_names_the_harness_knows(make_config):
    from hydra.utils import instantiate

    general = instantiate(make_config("general=trace").general)
    assert set(general.tasks) == {
        "mmlu",
        "gsm8k",
        "bbh_cot_fewshot",
        "tydiqa_goldp_en",
        "boolq",
        "piqa",
        "cl_bench_probe",
    }
    general.check()  # indexes the harness's own tasks too; running them needs their datasets


def test_the_general_mean_and_delta_leave_the_probe_out_when_traces_benchmarks_ran(tmp_path):
    from cl_bench.recording.results import RunRecorder

    rec = RunRecorder(tmp_path, {}, ["A"], ["accuracy"])
    rec.add_row([0.0], 0.0)
    rec.add_general({"mmlu": 40.0, "gsm8k": 20.0, "cl_bench_probe": 90.0})
    rec.add_row([50.0], 0.0)
    rec.add_general({"mmlu": 38.0, "gsm8k": 10.0, "cl_bench_probe": 10.0})
    assert rec.general_mean("base") == 30.0 and rec.general_mean("after_A") == 24.0  # FGGM's "General"
    assert rec.general_delta() == pytest.approx(-6.0)  # mean of (-2, -10); the probe's -80 left out
    rec.write()
    assert json.loads((tmp_path / "results.json").read_text())["general"]["mean"] == {"base": 30.0, "after_A": 24.0}
    probe_only = RunRecorder(tmp_path, {}, ["A"], ["accuracy"], writes=False)
    probe_only.add_row([0.0], 0.0)
    probe_only.add_general({"cl_bench_probe": 61.0})
    assert probe_only.general_mean("base") == 61.0
