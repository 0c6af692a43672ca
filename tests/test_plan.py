"""The memory planner (runners.plan): exact counts from architectures on the meta device, the
per-strategy accounting, the methods' own state, the verdict, and a check against measured memory."""

import pytest

from cl_bench.errors import ConfigError
from cl_bench.memory_plan import GIB, plan
from runners.plan import main

SEQ = ["train.max_prompt_len=1024", "train.max_ans_len=512"]


@pytest.mark.parametrize(
    "model, params", [("smollm2_135m", 134_515_008), ("qwen2_1_5b", 1_543_714_304), ("llama2_7b_chat", 6_738_415_616)]
)
def test_parameter_counts_come_from_the_architecture_without_weights(model, params, make_config):
    p = plan(make_config(f"model={model}", tiny=False))
    assert p.params == p.trainable == params  # the published sizes (SmolLM2's as loaded: tests/test_smollm2.py)
    assert p.items == {"weights": 4 * params, "gradients": 4 * params, "optimizer": 8 * params}


def test_each_strategy_divides_what_it_shards(make_config):
    n = 6_738_415_616
    base = ["model=llama2_7b_chat", "trainer.devices=8", "train.batch_size=16", *SEQ]
    ddp = plan(make_config(*base, "trainer=ddp", tiny=False))
    assert ddp.items == {"weights": 4 * n, "gradients": 4 * n, "optimizer": 8 * n, "DDP gradient buckets": 4 * n}
    fsdp = plan(make_config(*base, "trainer=fsdp", tiny=False))
    layer = 202_383_360  # one Llama-2-7B decoder layer: 4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096
    assert fsdp.items == {
        "weights (shard)": 4 * n // 8,
        "gathered layers (2 U)": 2 * layer * 2,
        "gradients (shard)": 4 * n // 8,
        "optimizer (shard)": 8 * n // 8,
    }
    ds = plan(make_config(*base, "trainer=deepspeed", tiny=False))
    assert ds.items == {
        "weights": 2 * n,
        "gradients (shard)": 2 * n // 8,
        "optimizer: fp32 master + moments (shard)": 12 * n // 8,
    }
    assert ddp.micro_batch == 2 and ddp.seq_len == 1536
    assert fsdp.refusal is None or "fsdp" in fsdp.refusal


def test_lora_and_the_methods_own_state(make_config):
    n, lora = 6_738_415_616, 32 * 2 * (8 * 4096 + 4096 * 8)  # r 8 on q_proj and v_proj of 32 layers
    p = plan(make_config("model=llama2_7b_chat", "method=olora", "tasks.order=[arith,code,sentiment]", tiny=False))
    assert (p.params, p.trainable) == (n + lora, lora) and p.model.endswith("+lora(r=8)")
    assert p.items["gradients"] == 4 * lora and p.method_items == {"earlier tasks' adapters (frozen)": 2 * 4 * lora}
    q = 1_543_714_304
    ewc = plan(make_config("model=qwen2_1_5b", "method=ewc", "trainer=ddp", "trainer.devices=4", tiny=False))
    assert ewc.method_items["F and theta* (1 pair(s), float32)"] == 2 * 4 * q  # whole on each DDP process
    lwf = plan(make_config("model=qwen2_1_5b", "method=lwf", tiny=False))
    assert lwf.method_items == {"teacher (frozen copy)": 4 * q}
    refused = plan(make_config("model=qwen2_1_5b", "method=hft", "model.lora.enabled=true", tiny=False))
    assert "method hft does not train LoRA adapters" in refused.refusal


def test_the_verdict_and_the_exit_code(capsys):
    assert main(["--gpu-gib", "80", "model=llama2_7b_chat", "trainer=gpu", *SEQ]) == 1
    assert "does NOT fit in 80 GiB" in capsys.readouterr().out
    assert (
        main(
            [
                "--gpu-gib",
                "80",
                "model=llama2_7b_chat",
                "trainer=gpu",
                "model.lora.enabled=true",
                "train.micro_batch_size=1",
                *SEQ,
            ]
        )
        == 0
    )
    assert "fits in 80 GiB" in capsys.readouterr().out
    assert main(["model=hf", "model.name_or_path=/nowhere/model"]) == 2
    assert "model.name_or_path=/nowhere/model: no local folder" in capsys.readouterr().err


def test_without_a_size_the_verdict_names_the_common_gpus_it_fits(make_config, capsys):
    """Issue 25.5: without --gpu-gib the plan gave no verdict."""
    from cl_bench.memory_plan import GPU_SIZES

    p = plan(make_config("model=qwen2_1_5b", tiny=False))
    assert main(["model=qwen2_1_5b"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    fits = [g for g in GPU_SIZES if p.total <= g * GIB]
    assert fits and len(fits) < len(GPU_SIZES)  # the case has both kinds
    assert last.startswith(f"needs {p.total / GIB:.2f} GiB per GPU: fits {fits[0]} GiB (")
    assert f"too large for {', '.join(str(g) for g in GPU_SIZES if g not in fits)} GiB" in last


def test_a_plan_that_does_not_fit_says_what_would(make_config, capsys):
    run = ["model=llama2_7b_chat", "trainer=gpu", *SEQ]
    assert main(["--gpu-gib", "80", *run]) == 1
    out = capsys.readouterr().out
    suggestions = out.split("would fit 80 GiB with:\n")[1].strip().splitlines()
    changes = [line.rsplit(None, 2)[0].split() for line in suggestions]
    assert ["model.lora.enabled=true", "train.micro_batch_size=1"] in changes and [
        "trainer=fsdp",
        "trainer.devices=8",
    ] in changes
    for change, line in zip(changes, suggestions):  # each one re-planned fits, at the peak it says
        p = plan(make_config(*run, *change, tiny=False))
        assert p.fits(80) and line.endswith(f"{p.total / GIB:.2f} GiB")
    assert not plan(make_config(*run, "train.micro_batch_size=1", tiny=False)).fits(80)
    assert ["train.micro_batch_size=1"] not in changes


def test_bad_plan_inputs_are_refused_by_name(capsys):
    with pytest.raises(SystemExit) as refused:
        main(["--gpu-gib", "-3"])
    assert (
        refused.value.code == 2
        and "--gpu-gib: must be a GPU memory size in GiB above 0, got -3" in capsys.readouterr().err
    )
    assert main(["train.batch_size=0"]) == 2
    assert "train.batch_size must be an integer >= 1, got 0" in capsys.readouterr().err


def test_an_unknown_builder_is_named(make_config):
    with pytest.raises(ConfigError, match="model._target_ my.builder: the planner reads"):
        plan(make_config("model._target_=my.builder"))


@pytest.mark.slow
def test_the_plan_matches_memory_measured_on_the_cpu_within_20_percent(make_config):
    """SmolLM2 with LoRA and EWC: weights, gradients, optimizer and EWC's state, loaded for real
    (the full model with EWC: 3.05 GiB measured against 3.11 planned, docs/scaling.md)."""
    from cl_bench.memory_plan import measure
    from tests.conftest import MODEL_CACHE

    cfg = make_config(
        "method=ewc",
        "method.fisher=batch",
        "method.num_samples=4",
        "model.lora.enabled=true",
        "tasks.order=[arith]",
        "train.batch_size=2",
        f"model.cache_dir={MODEL_CACHE}",
        tiny=False,
    )
    planned, measured = plan(cfg), measure(cfg)
    assert abs(sum(measured.values()) / planned.states - 1) < 0.2, (measured, planned.states / GIB)


def test_under_fsdp_a_method_s_pass_holds_its_rows_and_evaluation_gathers_the_model(make_config):
    """EWC's Fisher and FGGM's scores run through the sharded model (methods/shared/importance.py): their
    pass holds this process's rows; evaluation gathers the whole model, a peak of its own."""
    n = 6_738_415_616
    base = ["model=llama2_7b_chat", "trainer=fsdp", "trainer.devices=8", "train.batch_size=16", *SEQ]
    ewc = plan(make_config(*base, "method=ewc", tiny=False))
    assert ewc.method_items == {
        "F and theta* (1 pair(s), float32)": 2 * 4 * n // 8,
        "theta - theta* buffer": 4 * 32000 * 4096 // 8,
    }  # rows of the largest tensor
    assert ewc.pass_items == {"importance pass: F + gradients": (4 * n + 4 * n) // 8}
    assert ewc.evaluation == 4 * n and ewc.total == ewc.states + max(ewc.activations + n, 4 * n)
    assert ewc.fits(80)  # before the Fisher ran through the sharded model: whole F, gradients and weights, 111 GiB
    fggm = plan(make_config(*base, "method=fggm", tiny=False))
    assert fggm.pass_items == {
        "scoring pass: scores (fp32)": 4 * n // 8,
        "scoring pass: a batch's gradients": 4 * n // 8,
    }
    one = plan(make_config("model=llama2_7b_chat", "method=ewc", *SEQ, tiny=False))
    assert one.method_items["theta - theta* buffer"] == 4 * 32000 * 4096 and one.evaluation == 0
    assert one.pass_items == {"importance pass: F + gradients": 8 * n}


def test_gere_plans_its_extra_forward_on_the_gpu_and_its_bands_on_the_host(make_config):
    """Issue 24.6: batch mode's forward of the step's general texts (per micro-batch: per_step over
    the step's micro-batches) is a peak item at the run's precision; the int8 bands live on the host."""
    from cl_bench.memory_plan import activation_bytes, meta_model

    cfg = make_config(
        "model=llama2_7b_chat",
        "method=gere",
        "trainer=gpu",
        "method.per_step=4",
        "train.micro_batch_size=2",
        tiny=False,
    )
    p = plan(cfg)
    config = meta_model(cfg.model).config
    # batch 4 in micro-batches of 2: 2 micro-batches share 4 texts, 2 each, in bf16 (e = 2)
    assert p.pass_items == {"general texts' forward (2 x 563 tokens)": activation_bytes(config, 2, 563, 563, 2, None)}
    assert 2.8 * 2**30 < activation_bytes(config, 1, 563, 563, 2, None) < 3.1 * 2**30  # ~2.9 GiB per text
    assert p.method_items == {} and p.host_items == {"hidden-state bands (int8)": 64 * 563 * 4096}
    assert p.total == p.states + p.activations + sum(p.pass_items.values())
    assert (
        plan(make_config("model=llama2_7b_chat", "method=gere", "method.mode=interleave", tiny=False)).pass_items == {}
    )


def test_the_vllm_engine_s_reservation_counts_on_the_evaluation_side(make_config, capsys):
    """The engine reserves eval.vllm.memory_fraction of the GPU while it evaluates and sleeps while
    training runs: the peak is the states plus the larger of training and that reservation."""
    base = ["model=qwen2_1_5b", *SEQ]
    plain = plan(make_config(*base, tiny=False))
    engine = plan(make_config(*base, "eval.engine=vllm", "eval.vllm.memory_fraction=0.4", tiny=False))
    assert plain.engine_fraction == 0 and plain.peak(80) == plain.total
    assert engine.items == plain.items and engine.total == plain.total  # the states are the same
    training = engine.activations + sum(engine.pass_items.values())
    for gib in (24, 80):
        assert engine.peak(gib) == engine.states + max(training, int(0.4 * gib * GIB))
    assert engine.fits(80) == (engine.states + max(training, int(0.4 * 80 * GIB)) <= 80 * GIB)
    assert main(["--gpu-gib", "80", *base, "eval.engine=vllm", "eval.vllm.memory_fraction=0.4"]) in (0, 1)
    out = capsys.readouterr().out
    assert "evaluation: vLLM engine (40% of the GPU)" in out and f"{0.4 * 80:9.2f}" in out


def test_grpo_plans_its_frozen_base_model_and_a_pass_over_g_completions_of_every_prompt(make_config):
    q = 1_543_714_304
    base = ["model=qwen2_1_5b", "train.batch_size=4", *SEQ]
    sft = plan(make_config(*base, tiny=False))
    grpo = plan(make_config(*base, "learning=grpo", "learning.num_generations=8", tiny=False))
    assert grpo.items == {**sft.items, "base model (frozen copy, for the KL to it)": 4 * q}
    assert grpo.activations == 8 * sft.activations  # activations are linear in the rows of a pass
    kl = plan(make_config(*base, "learning=grpo", "learning.kl_telemetry=false", tiny=False))
    assert kl.items == sft.items  # no KL term, no telemetry: no copy
    assert (
        "base model (frozen copy, for the KL to it)"
        in plan(make_config(*base, "eval.kl_to_base=true", tiny=False)).items
    )
    refused = plan(make_config(*base, "learning=grpo", "method=lwf", tiny=False))
    assert "method lwf cannot be combined with learning=grpo" in refused.refusal
