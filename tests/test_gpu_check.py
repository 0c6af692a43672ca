"""The GPU check (runners/gpu_check.py), rehearsed on the CPU at the tiny model's size so that the
one command a lent GPU gets cannot rot; its FLOP count against torch's own counter."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from runners.gpu_check import METHODS, flops_per_token, main, peak_tflops


def test_the_flops_per_token_equal_torchs_flop_counter_on_a_training_step():
    """6 x the matrix-product weights + 12 x layers x hidden x sequence per token is what torch's
    FlopCounterMode counts for a forward and backward pass over every position (eager attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config)
    batch, seq = 2, 32
    ids = torch.randint(0, 300, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    assert counter.get_total_flops() == pytest.approx(flops_per_token(model, seq) * batch * seq, rel=0.02)


def test_the_mfu_denominator_is_the_cards_dense_bf16_peak_by_its_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA GH200 480GB") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA L40S") == 362.0 and peak_tflops("NVIDIA L4") == 121.0
    assert peak_tflops("Tesla T4") is None


@pytest.mark.processes
def test_the_check_runs_every_section_on_the_cpu_and_writes_its_json_and_table(tmp_path, monkeypatch, cache_dir):
    """``--small``: the SFT step, generation, every method's short run beside its plan, and the two
    stream runs (the single-device and the FSDP trainer) reach their end; the report holds them."""
    monkeypatch.setenv("CL_BENCH_CACHE", str(cache_dir))
    monkeypatch.chdir(tmp_path)
    args = ["--small", "--out", str(tmp_path / "check"), "--work", str(tmp_path / "work"), "--budget-s", "600"]
    assert main(args) == 0
    assert sorted(p.name for p in (tmp_path / "check").iterdir()) == ["gpu_check.json", "gpu_check.md"]
    assert (tmp_path / "work" / "memory" / "ewc" / "results.json").is_file()  # the runs' dirs kept apart
    report = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    sections = report["sections"]
    assert set(sections) == {"environment", "sft_step", "generation", "memory", "streams"}
    step = sections["sft_step"]
    assert step["tokens_per_s"] > 0 and step["mfu"] is None and step["lightning_over_bare"] > 0
    assert [r["method"] for r in sections["memory"]] == list(METHODS)
    assert all(r["status"] == "finished" and r["planned_gib"] > 0 for r in sections["memory"])
    assert 0 < sections["generation"]["rollouts"]["tokens"] <= 2 * 4 * 8  # 2 prompts x G = 4, 8 tokens at most
    runs = {r["trainer"]: r for r in sections["streams"]}
    assert set(runs) == {"gpu", "fsdp"} and all(r["status"] == "finished" and r["R_rows"] == 3 for r in runs.values())
    table = (tmp_path / "check" / "gpu_check.md").read_text()
    assert "| SFT step |" in table and "| trainer=fsdp | 0 | finished | 3 |" in table
