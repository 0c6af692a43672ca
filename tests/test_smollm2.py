"""The real offline model (SmolLM2-135M-Instruct): kept few, marked slow."""

import pytest

from cl_bench.data.tasks import Example
from cl_bench.evaluation.generation import GenerationConfig, generate
from cl_bench.models import load_smollm2
from cl_bench.stream_run import run
from tests.conftest import MODEL_CACHE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2(str(MODEL_CACHE))


def test_converted_model_answers_and_batched_generation_matches_single(smollm2):
    assert sum(p.numel() for p in smollm2.model.parameters()) == 134_515_008
    assert smollm2.tokenizer.padding_side == "left"
    examples = [Example("What is the capital of France? Answer:", ""), Example("Question: What is 2 + 2?\nAnswer:", "")]
    cfg = GenerationConfig(batch_size=2)
    batched = generate(smollm2.model, smollm2.tokenizer, examples, 12, cfg)
    single = [generate(smollm2.model, smollm2.tokenizer, [ex], 12, cfg)[0] for ex in examples]
    assert batched == single  # left padding + position ids: batching does not change greedy answers


def test_short_stream_on_smollm2_learns_the_first_task(make_config):
    cfg = make_config(
        "tasks.order=[minutes]",  # learned in a few steps (sentiment took 24 to pass 50, 67 s on one thread)
        "tasks.max_steps=8",
        "tasks.num_train=32",
        "eval.max_examples=8",
        "trainer.enable_progress_bar=false",
        "logger=none",
        f"model.cache_dir={MODEL_CACHE}",
        tiny=False,
    )
    R = run(cfg, cfg.paths.output_dir).R
    assert R[1][0] >= R[0][0] + 50  # ROUGE-L after 8 steps of minutes (measured 0 -> 100 on 2026-12-07)


def test_smollm2_scores_well_above_chance_on_the_offline_probe(smollm2):
    from cl_bench.evaluation.general_ability import GeneralAbility

    # half the probe (it is shuffled: every category is in it), 20 s on one thread instead of 46
    general = GeneralAbility(tasks={"cl_bench_probe": "acc,none"}, batch_size=16, limit=140)
    general.check()
    score = general.evaluate(smollm2.model, smollm2.tokenizer)["cl_bench_probe"]
    assert score >= 50.0  # 4 choices: chance is 25 (measured 56.4 on these 140, 61.4 on all 280)


def test_a_lora_stage_checkpoint_is_under_5_percent_of_the_full_one(smollm2, make_config, tmp_path):
    import torch

    from cl_bench.models import build_model
    from cl_bench.training.checkpointing import restore_weights, stage_weights

    cfg = make_config("model.lora.enabled=true", f"model.cache_dir={MODEL_CACHE}", tiny=False)
    lora = build_model(cfg.model).model
    torch.save({"model": stage_weights(smollm2.model)}, tmp_path / "full.pt")
    torch.save({"model": stage_weights(lora)}, tmp_path / "lora.pt")
    full, small = (tmp_path / "full.pt").stat().st_size, (tmp_path / "lora.pt").stat().st_size
    assert small < 0.05 * full, (small, full)
    restore_weights(lora, torch.load(tmp_path / "lora.pt", weights_only=True)["model"])
