"""LoRA adapters (model.lora, peft): what trains, what stage checkpoints keep, exact resume, refusals."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from cl_bench.errors import ConfigError
from cl_bench.models import build_model, is_adapter
from cl_bench.stream_run import run
from cl_bench.training.parameter_views import ParameterViews
from tests.conftest import METHOD_NAMES, method_class

LORA = ["model.lora.enabled=true", "model.lora.r=4", "tasks.order=[arith,code]"]


def test_only_the_adapters_train_and_the_base_weights_stay_bitwise(make_config):
    """Three steps of the run's own optimizer (CLModule.configure_optimizers) on a LoRA model."""
    from functools import partial

    from cl_bench.data.loaders import TaskLoaders
    from cl_bench.training.lm import causal_lm_loss
    from cl_bench.training.module import CLModule
    from methods.sft import SFT
    from tests.conftest import tiny_task

    TASK = tiny_task()
    cfg = make_config(*LORA)
    bundle = build_model(cfg.model)
    trainable = {n for n, p in bundle.model.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter(n) and ("q_proj" in n or "v_proj" in n) for n in trainable)
    before = {n: p.detach().clone() for n, p in bundle.model.named_parameters()}
    loaders = TaskLoaders(bundle.tokenizer, batch_size=4, max_prompt_len=64, max_ans_len=8)
    module = CLModule(bundle.model, SFT(), partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1), loaders=loaders)
    optimizer = module.configure_optimizers()
    for batch in list(loaders.passes(TASK.train))[:3]:
        causal_lm_loss(bundle.model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = dict(bundle.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if n not in trainable)
    assert any(not torch.equal(before[n], after[n]) for n in trainable if "lora_B" in n)


def test_stage_checkpoints_keep_only_the_adapters_and_a_resume_from_one_is_exact(make_config, tmp_path):
    cfg = make_config(*LORA, "checkpoint.keep_stages=null")
    whole = Path(cfg.paths.output_dir)
    run(cfg, whole)
    final = torch.load(whole / "checkpoints" / "stage-002.pt", weights_only=True)["model"]
    assert final and all(is_adapter(k) for k in final)
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    (resumed / "checkpoints" / "stage-002.pt").unlink()  # continue after task 1 from its adapters alone
    run(cfg, resumed)
    again = torch.load(resumed / "checkpoints" / "stage-002.pt", weights_only=True)["model"]
    assert (
        json.loads((resumed / "results.json").read_text())["R"] == json.loads((whole / "results.json").read_text())["R"]
    )
    assert all(torch.equal(again[k], final[k]) for k in final)


def test_methods_that_do_not_train_adapters_and_bad_targets_are_refused(make_config):
    from methods.hft import HFT

    with pytest.raises(ConfigError, match="method hft does not train LoRA adapters .*method=inclora or olora"):
        HFT().check_run(make_config("method=hft", *LORA))
    with pytest.raises(ConfigError, match=r"model.lora.target_modules \['nope'\]"):
        build_model(make_config(*LORA, "model.lora.target_modules=[nope]").model)
    with pytest.raises(ConfigError, match="model.lora.r must be an integer >= 1"):
        build_model(make_config(*LORA, "model.lora.r=0").model)


# What each method's state is built on under LoRA: the adapters, never a base weight (a method
# keeping no per-weight state reads as []).
STATE_NAMES = {
    "ewc": lambda m: list(m.names),
    "mas": lambda m: list(m.names),
    "ewc_trace": lambda m: list(m.fisher),
    "fggm": lambda m: list(m.last_scores),
    "random_mask": lambda m: list(m.last_scores),
    "migu": lambda m: [f"{n}.weight" for n in m.last_masks],
    "agft": lambda m: list(m.gate),
}


@pytest.mark.parametrize("name", [n for n in METHOD_NAMES if method_class(n).trains_lora])
def test_every_method_marked_for_lora_runs_a_lora_stream_with_the_base_model_bitwise_frozen(
    name, make_config, monkeypatch, tmp_path
):
    """docs/methods.md's LoRA column (every method that declares ``trains_lora``): each runs a
    2-task stream on adapters; the base weights
    end bitwise as loaded; the method's own state (F, masks, |Wx| rows) is over adapter weights."""
    from cl_bench.config import build
    from tests.conftest import instantiate_with

    texts = tmp_path / "general.jsonl"
    texts.write_text("\n".join(json.dumps({"text": f"General text {i}: the quick fox."}) for i in range(4)))
    cheap = {"gere": [f"method.general_data={texts}"], "fggm": ["method.num_samples=4"]}
    cfg = make_config(
        f"method={name}", *LORA, "tasks.num_train=8", "tasks.num_test=2", "eval.max_examples=2", *cheap.get(name, [])
    )
    method = build(cfg.method)
    assert method.trains_lora
    seen = {}
    start = method.on_stream_start

    def spy(module, stream):
        seen["model"] = module.model
        seen["base"] = {n: p.detach().clone() for n, p in module.model.named_parameters() if not is_adapter(n)}
        start(module, stream)

    method.on_stream_start = spy
    monkeypatch.setattr("cl_bench.config.instantiate", instantiate_with(method))
    recorder = run(cfg, cfg.paths.output_dir)
    assert len(recorder.R) == 3
    now = dict(seen["model"].named_parameters())
    assert seen["base"] and all(torch.equal(v, now[n]) for n, v in seen["base"].items())
    names = STATE_NAMES.get(name, lambda m: [])(method)
    assert all(is_adapter(n) for n in names)
    if name in STATE_NAMES:
        assert names, f"{name} kept no state"


# --- IncLoRA and O-LoRA --------------------------------------------------------------------------
def _two_adapters(method_name="olora", **kwargs):
    """A tiny LoRA model after IncLoRA/O-LoRA's start of task 2: adapters default and task2, with
    every B made non-zero so that each adapter changes the output."""
    from omegaconf import OmegaConf

    from methods.inclora import IncLoRA
    from methods.olora import OLoRA

    node = OmegaConf.create(
        {
            "_target_": "cl_bench.models.tiny_llama",
            "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        }
    )
    model = build_model(node).model
    method = OLoRA(**kwargs) if method_name == "olora" else IncLoRA()
    module = type("M", (), {"model": model, "should_log": False})()
    method.on_stream_start(module, None)
    method.on_task_start(module, None, 0)
    method.on_task_start(module, None, 1)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return method, module, model


def test_inclora_output_is_the_base_model_plus_every_adapter_and_only_the_newest_trains():
    from cl_bench.models import tiny_llama

    method, _, model = _two_adapters("inclora")
    assert method.adapters == ["default", "task2"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".task2." in n for n in trainable)
    merged = tiny_llama().model  # the same seeded base weights, with W + s * sum_i B_i A_i written in
    with torch.no_grad():
        for layer_name, layer in model.base_model.model.model.named_modules():
            if hasattr(layer, "lora_A") and isinstance(layer.lora_A, torch.nn.ModuleDict):
                delta = sum(layer.scaling[a] * layer.lora_B[a].weight @ layer.lora_A[a].weight for a in method.adapters)
                merged.model.get_submodule(layer_name).weight.add_(delta)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    model.eval(), merged.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("orthogonality", ["abs", "square"])
def test_olora_orthogonality_term_and_its_gradient_equal_a_direct_computation(orthogonality):
    method, module, model = _two_adapters(lambda_1=0.5, lambda_2=0.25, orthogonality=orthogonality)
    layers = method.lora_layers()
    assert len(layers) == 4  # q_proj and v_proj of 2 blocks
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    logged = {}
    module.should_log, module.log_metrics = True, logged.update
    method.on_train_start(None, module)
    method.edit_gradients(module, ParameterViews(model))
    penalty = torch.tensor(0.5 * logged["olora/orthogonality"] + 0.25 * logged["olora/l2"])
    expected, grads = 0.0, {}
    for layer in layers:  # TRACE's form: the earlier A's concatenated (one here), against the new A
        a_old, a_new = layer.lora_A["default"].weight.detach(), layer.lora_A["task2"].weight.detach()
        overlap = a_old @ a_new.T
        expected += 0.5 * (overlap.abs().sum() if orthogonality == "abs" else overlap.square().sum())
        # d/dA_new: sum|A_old A_new^T| -> sign(O)^T A_old; sum O^2 -> 2 O^T A_old; and the L2 norms
        d_orth = (overlap.sign() if orthogonality == "abs" else 2 * overlap).T @ a_old
        grads[id(layer.lora_A["task2"].weight)] = 0.5 * d_orth + 0.25 * a_new / a_new.norm()
        b_new = layer.lora_B["task2"].weight.detach()
        expected += 0.25 * (a_new.norm() + b_new.norm())
        grads[id(layer.lora_B["task2"].weight)] = 0.25 * b_new / b_new.norm()
    torch.testing.assert_close(penalty.detach(), torch.as_tensor(expected, dtype=penalty.dtype), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if ".task2." in n:
            torch.testing.assert_close(p.grad, grads[id(p)], rtol=1e-5, atol=1e-6)
        else:
            assert p.grad is None  # the earlier adapter and the base have no gradient


def test_olora_stream_keeps_earlier_adapters_bitwise_and_resumes_exactly(make_config, tmp_path):
    cfg = make_config("method=olora", "model.lora.r=4", "tasks.order=[arith,code]", "checkpoint.keep_stages=null")
    assert cfg.model.lora.enabled  # method=olora turns LoRA on by itself
    whole = Path(cfg.paths.output_dir)
    run(cfg, whole)
    first = torch.load(whole / "checkpoints" / "stage-001.pt", weights_only=True)
    final = torch.load(whole / "checkpoints" / "stage-002.pt", weights_only=True)
    assert first["method"]["adapters"] == ["default"] and final["method"]["adapters"] == ["default", "task2"]
    assert set(first["model"]) and all(".default." in k for k in first["model"])
    assert all(torch.equal(final["model"][k], v) for k, v in first["model"].items())  # task 1's adapter, untouched
    assert any(".task2." in k and "lora_B" in k and v.abs().sum() > 0 for k, v in final["model"].items())
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    (resumed / "checkpoints" / "stage-002.pt").unlink()
    run(cfg, resumed)
    again = torch.load(resumed / "checkpoints" / "stage-002.pt", weights_only=True)["model"]
    assert (
        json.loads((resumed / "results.json").read_text())["R"] == json.loads((whole / "results.json").read_text())["R"]
    )
    assert again.keys() == final["model"].keys() and all(torch.equal(again[k], final["model"][k]) for k in again)


def test_inclora_refusals(make_config):
    from methods.inclora import IncLoRA

    with pytest.raises(
        ConfigError, match="method inclora trains one LoRA adapter per task: it needs model.lora.enabled"
    ):
        IncLoRA().check_run(make_config("method=inclora", "model.lora.enabled=false"))
    with pytest.raises(ConfigError, match="optimizer.reset_per_task must be true"):
        IncLoRA().check_run(make_config("method=inclora", "optimizer.reset_per_task=false"))
    from methods.olora import OLoRA

    with pytest.raises(ConfigError, match="method.orthogonality must be one of"):
        OLoRA(orthogonality="frobenius")
