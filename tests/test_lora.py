"""LoRA adapters (model.lora, peft): what trains, what stage checkpoints keep, exact resume, refusals."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from cl_bench.errors import ConfigError
from cl_bench.models import build_model, is_adapter
from cl_bench.stream_run import run

LORA = ["model.lora.enabled=true", "model.lora.r=4", "tasks.order=[arith,code]"]


def test_only_the_adapters_train_and_the_base_weights_stay_bitwise(make_config):
    """Three steps of the run's own optimizer (CLModule.configure_optimizers) on a LoRA model."""
    from functools import partial
    from cl_bench.data.loaders import TaskLoaders
    from cl_bench.training.lm import causal_lm_loss
    from cl_bench.training.module import CLModule
    from methods.sft import SFT
    from tests.test_methods import TASK
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
    assert json.loads((resumed / "results.json").read_text())["R"] == json.loads((whole / "results.json").read_text())["R"]
    assert all(torch.equal(again[k], final[k]) for k in final)


def test_methods_that_do_not_train_adapters_and_bad_targets_are_refused(make_config):
    from methods.ewc import EWC
    with pytest.raises(ConfigError, match="method ewc does not train LoRA adapters"):
        EWC().check_run(make_config("method=ewc", *LORA))
    with pytest.raises(ConfigError, match=r"model.lora.target_modules \['nope'\]"):
        build_model(make_config(*LORA, "model.lora.target_modules=[nope]").model)
    with pytest.raises(ConfigError, match="model.lora.r must be an integer >= 1"):
        build_model(make_config(*LORA, "model.lora.r=0").model)
