"""The overhead benchmark runs (its numbers are recorded in docs/benchmarks.md, not asserted)."""

import json

import pytest

from tests.launch import run_module


def test_bench_runs_both_paths_on_identical_steps(tmp_path):
    proc = run_module(
        "runners.bench",
        "model=tiny_llama",
        "bench.steps=4",
        "bench.warmup=1",
        "bench.repeats=2",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path}",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert len(result["all"]["bare"]) == len(result["all"]["lightning"]) == 2
    assert result["ratio"] == result["lightning_s_per_step"] / result["bare_s_per_step"] > 0
    assert "lightning / bare" in proc.stdout


def test_bench_methods_reports_every_method_relative_to_sft(tmp_path):
    proc = run_module(
        "runners.bench_methods",
        "model=tiny_llama",
        "bench.steps=3",
        "bench.warmup=1",
        "bench.repeats=1",
        "bench.methods=[sft,fggm,ewc,'agft/scale=update',magmax]",
        "tasks.num_train=8",
        "trainer.enable_progress_bar=false",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path}",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads((tmp_path / "bench_methods.json").read_text())["rows"]}
    assert rows["sft"]["ratio"] == 1.0 and rows["sft"]["state_bytes"] == 0
    assert rows["fggm"]["fisher_s"] > 0 and rows["ewc"]["fisher_s"] > 0
    assert rows["agft/scale=update"]["fisher_s"] > 0  # its attribution pass, over every sample (bench.overrides)
    # EWC keeps a Fisher and an anchor per weight (fp32): twice the model; FGGM only row masks
    assert rows["ewc"]["state_bytes"] > 5 * rows["fggm"]["state_bytes"]
    # a pass covers min(num_samples, N) examples and an epoch N: EWC's at N = 5000 only 512 of them,
    # FGGM's (num_samples null) the whole split, so its ratio does not depend on N
    ratios = rows["ewc"]["fisher_over_epoch"]
    assert ratios["5000"] == pytest.approx(ratios["8"] * 512 / 5000)
    assert rows["fggm"]["fisher_over_epoch"]["5000"] == pytest.approx(rows["fggm"]["fisher_over_epoch"]["8"])
    # MagMax merged after task 1 and keeps theta_0, the running maximum and theta_1: 3 float32 copies
    assert rows["magmax"]["merge_s"] > 0 and rows["ewc"]["merge_s"] is None
    assert rows["magmax"]["state_bytes"] == pytest.approx(1.5 * rows["ewc"]["state_bytes"], rel=0.01)


def test_bench_methods_on_stream_data_times_each_method_on_its_own_batches(tmp_path):
    """GeRe in concat mode trains task 2 on its examples plus the general texts: with bench.data=stream
    its timed batches are those, SFT's the task's own."""
    proc = run_module(
        "runners.bench_methods",
        "model=tiny_llama",
        "bench.steps=2",
        "bench.warmup=1",
        "bench.repeats=1",
        "bench.data=stream",
        "bench.methods=[sft,'gere/mode=concat,num_samples=4,generate_tokens=8']",
        "tasks.num_train=8",
        "trainer.enable_progress_bar=false",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path}",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads((tmp_path / "bench_methods.json").read_text())["rows"]}
    assert rows["sft"]["ratio"] == 1.0 and len(rows) == 2 and "own task-2 batches" in proc.stdout
    gere = rows["gere/mode=concat,num_samples=4,generate_tokens=8"]
    # its batches hold general texts (every token scored) among the task's short answers
    assert gere["labelled_tokens_per_step"] > rows["sft"]["labelled_tokens_per_step"] > 0


@pytest.mark.vllm
def test_bench_eval_counts_both_engines_alike(tmp_path):
    """HF at two batch sizes (and the vLLM engine where installed: the vllm venv runs this too):
    tokens counted alike, the best HF setting the reference of every row's agreement."""
    from cl_bench.generation.vllm_engine import vllm_available

    proc = run_module(
        "runners.bench_eval",
        "model=tiny_llama",
        "model.hidden_size=128",
        "model.num_heads=2",
        "model.initializer_range=0.15",
        "bench.eval.prompts=10",
        "bench.eval.max_new_tokens=8",
        "bench.eval.hf_batch_sizes=[4,10]",
        "bench.eval.vllm_variants=[{},{max_num_seqs:4}]",
        f"hydra.run.dir={tmp_path}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_eval.json").read_text())
    rows = result["rows"]
    assert [r["setting"] for r in rows[:2]] == ["batch 4", "batch 10"] and result["prompts"] == 10
    assert all(r["same_as_hf"] == 10 for r in rows[:2])  # batching does not change greedy answers here
    for r in rows:
        assert r["answer_tok_s"] == pytest.approx(r["answer_tokens"] / r["seconds"])
    assert ("ratio" in result) == vllm_available() == (len(rows) == 4)
    if vllm_available():  # one row per engine setting tried, the fastest named
        assert [r["setting"] for r in rows[2:]] == ["defaults", "max_num_seqs=4"]
        assert result["best_vllm"] in ("defaults", "max_num_seqs=4")
