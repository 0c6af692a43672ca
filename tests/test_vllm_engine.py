"""The vLLM engine (eval.engine=vllm) against Hugging Face ``generate``, the reference (lm-eval's own
docs warn that vLLM's outputs occasionally differ): on the same prompts, greedy, fp32, at least 95%
of the answers identical, every differing one reported; LoRA adapters handed over; the weights
synchronised once per version; a whole run's scores beside the default engine's. Skipped without the
engine (make install ENGINE=vllm; CI runs them in their own venv: make test-engine)."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cl_bench.data.tasks import Example
from cl_bench.errors import ConfigError
from cl_bench.evaluation.generation import GenerationConfig, generate
from cl_bench.generation.build import build_engine
from cl_bench.generation.engine import HFEngine
from cl_bench.generation.vllm_engine import VLLMEngine, VLLMSettings, vllm_available
from cl_bench.models import tiny_llama

needs_vllm = pytest.mark.skipif(
    not vllm_available(), reason="the vLLM engine is not installed (make install ENGINE=vllm)"
)
#: the tiny Llama at a head size the CPU backend's attention supports (16 is refused)
VLLM_TINY = ["model.hidden_size=128", "model.num_heads=2", "model.initializer_range=0.15"]
PROMPTS = [Example(f"Question {i}: what follows {i * 7 % 13}? Answer:", "") for i in range(24)]


def diverse_tiny(seed: int = 0):
    """The tiny Llama (head size 64) with weights wide enough that greedy answers differ by prompt."""
    return tiny_llama(hidden_size=128, num_heads=2, seed=seed, initializer_range=0.15)


#: greedy, 12 new tokens: the tiny model's generation settings in these tests
TINY_GENERATION = GenerationConfig(batch_size=8, max_prompt_len=128)


def answers(model, tokenizer, engine=None, **changes) -> list[str]:
    """The answers to :data:`PROMPTS`, by HF ``generate`` or by ``engine``."""
    return generate(engine or model, tokenizer, PROMPTS, 12, replace(TINY_GENERATION, **changes))


def tiny_engine(tmp_path: Path) -> VLLMEngine:
    return VLLMEngine(VLLMSettings(dtype="float32", cpu_kv_cache_gib=0.25), tmp_path / "engine")


def agreement(hf: list[str], engine: list[str]) -> float:
    differing = [(i, a, b) for i, (a, b) in enumerate(zip(hf, engine)) if a != b]
    for i, a, b in differing:  # every differing example reported
        print(f"example {i}: hf {a!r} vs vllm {b!r}")
    return 1 - len(differing) / len(hf)


def test_the_engine_is_refused_by_key_without_vllm_or_with_bad_settings(monkeypatch, tmp_path):
    import cl_bench.generation.vllm_engine as engine

    monkeypatch.setattr(engine, "vllm_available", lambda: False)
    with pytest.raises(
        ConfigError, match="eval.engine=vllm: vLLM is not installed; install the engine with `make install ENGINE=vllm`"
    ):
        build_engine({"engine": "vllm"}, tmp_path)
    assert isinstance(build_engine({"engine": "hf", "batch_size": 4}, tmp_path), HFEngine)
    with pytest.raises(ConfigError, match="eval.engine"):
        build_engine({"engine": "sglang"}, tmp_path)
    with pytest.raises(ConfigError, match="eval.vllm.memory_fraction"):
        VLLMSettings(memory_fraction=1.5)
    with pytest.raises(ConfigError, match="eval.vllm.cpu_kv_cache_gib"):
        VLLMSettings(cpu_kv_cache_gib=0)
    with pytest.raises(ConfigError, match="eval.vllm.weight_sync"):
        VLLMSettings(weight_sync="sometimes")


@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("weight_sync, starts", [("auto", 1), ("restart", 2)])
def test_greedy_answers_equal_hf_generate_and_weights_sync_once_per_version(tmp_path, weight_sync, starts):
    """In place (the default, the CPU backend's packed layers packed again) the running engine
    answers with the new weights as HF does; under restart a fresh engine does."""
    bundle = diverse_tiny()
    model, tokenizer = bundle.model, bundle.tokenizer
    hf = answers(model, tokenizer)
    assert len(set(hf)) > 5  # answers that depend on the prompt: a comparison that can fail
    engine = VLLMEngine(VLLMSettings(dtype="float32", cpu_kv_cache_gib=0.25, weight_sync=weight_sync), tmp_path / "e")
    engine.sync(model, version=0)
    fast = answers(model, tokenizer, engine)
    assert agreement(hf, fast) >= 0.95
    engine.sync(model, version=0)  # the same weights: nothing handed over
    assert engine.starts == 1
    with pytest.raises(ConfigError, match="need 1032 positions, the engine holds 1024"):  # not cut short silently
        engine.generate([[5] * 1020], 12, tokenizer.eos_token_id, tokenizer.pad_token_id)
    with torch.no_grad():  # new weights everywhere (every packed layer): the engine answers with them
        for name, p in model.named_parameters():
            if "proj" in name or "lm_head" in name:
                p.mul_(-1.3)
    engine.sync(model, version=1)
    assert engine.starts == starts
    flipped = answers(model, tokenizer, engine)
    assert agreement(answers(model, tokenizer), flipped) >= 0.95 and flipped != fast
    with torch.no_grad():  # a second sync: the weights handed over before are still there to load into
        model.lm_head.weight.mul_(-1)
    engine.sync(model, version=2)
    assert agreement(answers(model, tokenizer), answers(model, tokenizer, engine)) >= 0.95
    # sampled answers: reproducible, each request with its own seed
    sampled = {"do_sample": True, "temperature": 1.0, "seed": 3}
    assert answers(model, tokenizer, engine, **sampled) == answers(model, tokenizer, engine, **sampled)
    engine.close()


@pytest.mark.vllm
@needs_vllm
def test_three_active_lora_adapters_are_handed_over_as_hf_evaluates_them(tmp_path):
    """IncLoRA's and O-LoRA's forward pass: three adapters of different ranks and scalings, all
    active. The engine answers as HF does with all three (not with the first alone, which a request
    naming peft's saved folder got), and a running engine takes retrained adapters, no restart."""
    from peft import LoraConfig, get_peft_model

    bundle = diverse_tiny()
    tokenizer = bundle.tokenizer
    base = answers(bundle.model, tokenizer)
    targets = ["q_proj", "v_proj"]
    model = get_peft_model(bundle.model, LoraConfig(r=8, lora_alpha=32, target_modules=targets))
    model.add_adapter("task2", LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    model.add_adapter("task3", LoraConfig(r=8, lora_alpha=8, target_modules=targets))
    model.base_model.set_adapter(["default", "task2", "task3"])
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change what the model says
    hf = answers(model, tokenizer)
    model.base_model.set_adapter(["default"])
    first_only = answers(model, tokenizer)
    model.base_model.set_adapter(["default", "task2", "task3"])
    assert hf != base and sum(a != b for a, b in zip(hf, first_only)) > 3  # a test that can fail
    engine = tiny_engine(tmp_path)
    engine.sync(model, version=0)
    assert agreement(hf, answers(model, tokenizer, engine)) >= 0.95
    with torch.no_grad():  # trained further: the running engine takes the new adapters, no restart
        for name, p in model.named_parameters():
            if "lora_B" in name and "task3" in name:
                p.mul_(-2)
    hf_later = answers(model, tokenizer)
    engine.sync(model, version=1)
    later = answers(model, tokenizer, engine)
    assert engine.starts == 1 and hf_later != hf and agreement(hf_later, later) >= 0.95
    assert json.loads((tmp_path / "engine" / "adapter" / "adapter_config.json").read_text())["r"] == 20
    assert not any("lora" in k for k in json.loads((tmp_path / "engine" / "base" / "config.json").read_text()))
    engine.close()


@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("method", ["inclora", "olora"])
def test_an_adapter_per_task_run_scores_through_the_engine_as_through_hf(make_config, tmp_path, method):
    """Three tasks, three adapters: every stage's answers through vLLM equal HF's (95% at least,
    every differing one printed)."""
    from cl_bench.stream_run import run

    predictions = {}
    for engine in ("hf", "vllm"):
        cfg = make_config(
            *VLLM_TINY,
            f"method={method}",
            "model.lora.enabled=true",
            "model.lora.r=4",
            "tasks.order=[arith,sentiment,code]",
            "model.seed=1",
            "model.initializer_range=0.3",  # wider logits: fewer near ties between the top two tokens
            f"eval.engine={engine}",
            f"paths.output_dir={tmp_path / engine}",
        )
        run(cfg, cfg.paths.output_dir)
        out = Path(cfg.paths.output_dir) / "predictions"
        stages = {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}
        predictions[engine] = [r["prediction"] for s in sorted(stages) for t in stages[s] for r in stages[s][t]]
    assert len(predictions["hf"]) == 4 * 3 * 6 and len(set(predictions["hf"])) > 10, set(predictions["hf"])
    assert agreement(predictions["hf"], predictions["vllm"]) >= 0.95


@pytest.mark.vllm
@needs_vllm
def test_a_run_with_the_engine_scores_as_the_default_engine(make_config, tmp_path):
    from cl_bench.stream_run import run

    results = {}
    for engine in ("hf", "vllm"):
        cfg = make_config(
            *VLLM_TINY,
            "tasks.order=[arith,sentiment,code]",
            "model.seed=1",
            f"eval.engine={engine}",
            f"paths.output_dir={tmp_path / engine}",
        )
        recorder = run(cfg, cfg.paths.output_dir)
        out = Path(cfg.paths.output_dir)
        results[engine] = (
            recorder.R,
            {p.name: json.loads(p.read_text()) for p in (out / "predictions").glob("*.json")},
        )
        assert not (out / "engine").exists()  # the weights handed over are removed at the end
    (R_hf, pred_hf), (R_vllm, pred_vllm) = results["hf"], results["vllm"]
    hf = [r["prediction"] for stage in sorted(pred_hf) for task in pred_hf[stage] for r in pred_hf[stage][task]]
    fast = [r["prediction"] for stage in sorted(pred_vllm) for task in pred_vllm[stage] for r in pred_vllm[stage][task]]
    assert len(hf) == len(fast) == 4 * 3 * 6 and agreement(hf, fast) >= 0.95
    assert len(set(hf)) > 20  # answers that depend on the prompt and the stage
    flat = [v for row in R_vllm for v in row]
    assert flat == pytest.approx([v for row in R_hf for v in row], abs=100 / 6 + 1e-9)  # one answer of 6 at most


@pytest.mark.vllm
@pytest.mark.processes
@needs_vllm
def test_two_processes_each_with_an_engine_on_its_share_score_as_one(tmp_path, cache_dir):
    """DDP: every process runs its own engine on every other example (its share); the shares are
    gathered, so every process, and the run, gets the predictions and scores of one process (run
    in this process)."""
    from cl_bench.stream_run import run
    from tests.conftest import TINY, compose_config
    from tests.test_scale import _run_processes

    args = [*TINY, *VLLM_TINY, "tasks.order=[arith]", "eval.engine=vllm", "logger=none"]
    run(compose_config(args, tmp_path / "one", cache_dir), tmp_path / "one")
    _run_processes([*args, "trainer=ddp", f"hydra.run.dir={tmp_path / 'two'}"], "env", timeout=600)
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert one["status"] == two["status"] == "finished"
    flat = [v for row in two["R"] for v in row]
    assert flat == pytest.approx([v for row in one["R"] for v in row], abs=100 / 6 + 1e-9)  # one answer of 6
    for stage in one["stages"]:
        a, b = (json.loads((tmp_path / d / "predictions" / f"{stage}.json").read_text()) for d in ("one", "two"))
        assert agreement([r["prediction"] for t in a for r in a[t]], [r["prediction"] for t in b for r in b[t]]) >= 0.95


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
def test_smollm2_s_greedy_answers_on_a_stage_equal_hf_s(make_config, tmp_path):
    """The real model on the embedded stream's test examples (16 a task), fp32, greedy, each task's
    own answer budget: at least 95% of the answers identical, every differing one printed, and each
    task's score within one differing answer's worth of HF's."""
    from cl_bench.evaluation.generation import evaluate_stream
    from cl_bench.models import build_model
    from cl_bench.run_config import build_stream
    from tests.conftest import MODEL_CACHE

    cfg = make_config("general=none", f"model.cache_dir={MODEL_CACHE}", tiny=False)  # converted once, shared
    bundle, stream = build_model(cfg.model), build_stream(cfg.tasks)
    base = GenerationConfig(batch_size=16, max_prompt_len=cfg.train.max_prompt_len)
    hf_scores, hf = evaluate_stream(bundle.model, bundle.tokenizer, stream, base, "test", 16)
    longest = cfg.train.max_prompt_len + max(t.spec.max_new_tokens for t in stream)
    engine = VLLMEngine(VLLMSettings(dtype="float32"), tmp_path / "engine", longest=longest)
    engine.sync(bundle.model, version=0)
    scores, fast = evaluate_stream(engine, bundle.tokenizer, stream, base, "test", 16)
    engine.close()
    answers = [a for t in stream.names for a in hf[t]]
    assert agreement(answers, [a for t in stream.names for a in fast[t]]) >= 0.95
    for name, a, b in zip(stream.names, hf_scores, scores):
        differing = sum(x != y for x, y in zip(hf[name], fast[name]))
        assert abs(a - b) <= 100 * differing / len(hf[name]) + 1e-9, name


@pytest.mark.vllm
@pytest.mark.processes
@needs_vllm
def test_grpo_rolls_out_through_the_engine_and_a_killed_run_resumes_to_the_same_weights(tmp_path, cache_dir):
    """learning=grpo with eval.engine=vllm: every step's rollouts are sampled by the engine (its
    weights synchronised in place each step, no restart), and a run killed inside task 2 and resumed
    (a fresh engine on the restored weights) ends with the uninterrupted run's weights, R and
    telemetry, bitwise."""
    from cl_bench.stream_run import run
    from tests.conftest import compose_config
    from tests.test_learning import PROCESS_RUN, resumes_to_the_whole_run
    from tests.test_scale import TINY_RUN, children_threads, kill_inside_task_2

    common = [
        *TINY_RUN,
        *VLLM_TINY,
        *PROCESS_RUN,
        "eval.engine=vllm",
        "tasks.num_train=16",
        "train.batch_size=2",
        "checkpoint.every_n_steps=3",
    ]
    with children_threads():
        recorder = run(compose_config(common, tmp_path / "whole", cache_dir), tmp_path / "whole")
    steps = sum(t["steps"] for t in recorder.learning_report["tasks"].values())
    assert recorder.timings["engine_starts"] == 1 and steps >= 16  # one engine for every step's rollouts
    killed = tmp_path / "killed"
    kill_inside_task_2(common, killed)
    resumes_to_the_whole_run(common, tmp_path / "whole", killed, tmp_path / "resumed_log")
