"""Mixed precision keeps fp32 master weights: small updates land; in pure bf16 they are rounded away."""

import logging
from functools import partial

import pytest
import torch
from lightning import Trainer

from cl_bench.data.loaders import TaskLoaders
from cl_bench.data.tasks import Example
from cl_bench.models import tiny_llama
from cl_bench.training.module import CLModule
from cl_bench.training.parameter_views import ParameterViews
from cl_bench.training.trainer import warn_low_precision_weights
from methods.sft import SFT

EXAMPLES = [Example(f"q{i} x{i * 3}? Answer:", f"a{i}") for i in range(4)]


def _one_step(dtype: torch.dtype) -> tuple[dict, dict, dict]:
    """Weights before and after one AdamW step at lr 1e-5 under bf16-mixed autocast, and the gradients."""
    bundle = tiny_llama(seed=0)
    model = bundle.model.to(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {}

    class Keep(SFT):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.update({n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()})

    loaders = TaskLoaders(bundle.tokenizer, batch_size=4, max_prompt_len=32, max_ans_len=8)
    method = Keep()
    module = CLModule(model, method, partial(torch.optim.AdamW, lr=1e-5, weight_decay=0.0), loaders=loaders)
    trainer = Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_steps=1,
        callbacks=[method],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loaders.training(EXAMPLES, seed=0))
    return before, {n: p.detach() for n, p in model.named_parameters()}, grads


def test_fp32_master_weights_take_every_small_update():
    before, after, grads = _one_step(torch.float32)
    moved = [n for n in grads if (grads[n] != 0).any()]
    assert moved  # the bf16-autocast backward reached every layer
    for n in moved:
        nonzero = grads[n] != 0
        assert torch.all(after[n][nonzero] != before[n][nonzero]), n


def test_bf16_weights_lose_most_small_updates():
    before, after, grads = _one_step(torch.bfloat16)
    nonzero = {n: grads[n] != 0 for n in grads}
    lost = sum(int(((after[n] == before[n]) & nonzero[n]).sum()) for n in grads)
    total = sum(int(nonzero[n].sum()) for n in grads)
    assert lost / total > 0.5  # norm weights at 1.0 and most others keep their old value
    norms = [n for n in grads if "norm" in n]
    assert all(torch.equal(after[n], before[n]) for n in norms)


def test_bf16_weights_are_warned_about_at_start(caplog):
    model = tiny_llama().model
    with caplog.at_level(logging.WARNING):
        assert not warn_low_precision_weights(model)
        assert warn_low_precision_weights(model.to(torch.bfloat16))
    assert "bfloat16: AdamW updates them in place" in caplog.text and "model.dtype=float32" in caplog.text


def _norm(params) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])).item()


def test_bf16_mixed_clips_the_gradients_of_the_default_fused_adamw():
    """The defaults (fused AdamW, gradient_clip_val) under bf16-mixed, as trainer=gpu runs them:
    Lightning refuses to clip for any fused optimizer under mixed precision (fp16's step unscales
    itself); bf16 has no loss scale, so CLModule clips as in fp32 and the step used the clipped norm
    (read after it: Lightning runs the forward and backward inside optimizer.step)."""
    bundle = tiny_llama(seed=0)
    norms = {}

    class Keep(SFT):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            norms["computed"] = _norm(pl_module.model.parameters())

    loaders = TaskLoaders(bundle.tokenizer, batch_size=4, max_prompt_len=32, max_ans_len=8)
    method = Keep()
    module = CLModule(bundle.model, method, partial(torch.optim.AdamW, lr=1e-5, fused=True), loaders=loaders)
    configure = module.configure_optimizers

    def with_spy():
        optimizer = configure()
        optimizer.register_step_post_hook(
            lambda opt, args, kwargs: norms.update(stepped=_norm(bundle.model.parameters()))
        )
        return optimizer

    module.configure_optimizers = with_spy
    trainer = Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        gradient_clip_val=1e-3,
        max_steps=1,
        callbacks=[method],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loaders.training(EXAMPLES, seed=0))
    assert norms["computed"] > 1e-1
    assert abs(norms["stepped"] - 1e-3) < 1e-6


def test_fp16_mixed_with_a_fused_optimizer_and_clipping_is_refused_at_start(make_config):
    from cl_bench.errors import ConfigError
    from cl_bench.training.trainer import check_precision

    with pytest.raises(ConfigError, match=r"trainer.precision=16-mixed with optimizer.fused=true cannot clip"):
        check_precision(make_config("trainer.precision=16-mixed"))
    check_precision(make_config("trainer.precision=16-mixed", "optimizer.fused=false"))
    check_precision(make_config("trainer.precision=16-mixed", "trainer.gradient_clip_val=null"))
    check_precision(make_config("trainer.precision=bf16-mixed"))


def _linear_dtypes(model) -> tuple[list, list]:
    """Hooks that record the output dtype of every forward of the first attention projection."""
    seen = []
    layer = model.model.layers[0].self_attn.q_proj
    return seen, [layer.register_forward_hook(lambda m, args, out: seen.append(out.dtype))]


def test_method_passes_run_at_the_runs_precision(make_config, monkeypatch):
    """Issue 24.6: under bf16-mixed, Lightning autocasts only training_step; the methods' passes at
    stream start and at each task's start and end run under the same autocast (the runner's one
    helper, CLModule.precision_context), so a Fisher or a teacher cache sees what training sees."""
    from cl_bench.stream_run import run
    from tests.conftest import instantiate_with

    dtypes = {}

    class Probe(SFT):
        def forward_pass(self, module, when):
            seen, hooks = _linear_dtypes(module.model)
            batch = next(iter(module.pass_loader(EXAMPLES)))
            module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            dtypes[when] = seen[0]
            for h in hooks:
                h.remove()

        def on_stream_start(self, module, stream):
            self.forward_pass(module, "stream start")

        def on_task_start(self, module, task, task_index):
            self.forward_pass(module, "task start")

        def on_task_end(self, module, task, task_index):
            self.forward_pass(module, "task end")

    monkeypatch.setattr("cl_bench.config.instantiate", instantiate_with(Probe()))
    cfg = make_config("trainer.precision=bf16-mixed", "tasks.order=[arith]", "tasks.max_steps=1")
    run(cfg, cfg.paths.output_dir)
    assert dtypes == {"stream start": torch.bfloat16, "task start": torch.bfloat16, "task end": torch.bfloat16}
    cfg = make_config("tasks.order=[arith]", "tasks.max_steps=1")  # 32-true: no autocast
    run(cfg, f"{cfg.paths.output_dir}-fp32")
    assert set(dtypes.values()) == {torch.float32}


def test_agem_reference_gradient_is_taken_at_the_steps_precision():
    """Issue 24.6: A-GEM's g_ref (in edit_gradients, outside Lightning's autocast) comes
    from a bf16 forward, as g does, under bf16-mixed."""
    from methods.agem import AGEM

    bundle = tiny_llama(seed=0)
    loaders = TaskLoaders(bundle.tokenizer, batch_size=4, max_prompt_len=32, max_ans_len=8)
    method = AGEM(per_task=4)
    module = CLModule(
        bundle.model, method, partial(torch.optim.AdamW, lr=1e-5), loaders=loaders, precision="bf16-mixed"
    )
    method.on_stream_start(module, None)
    method.memory = [EXAMPLES]
    for p in module.model.parameters():
        p.grad = torch.zeros_like(p)
    seen, hooks = _linear_dtypes(module.model)
    method.edit_gradients(module, ParameterViews(module.model))
    assert seen and set(seen) == {torch.bfloat16}
    for h in hooks:
        h.remove()
    module.precision = "32-true"
    seen.clear()
    seen, hooks = _linear_dtypes(module.model)
    method.edit_gradients(module, ParameterViews(module.model))
    assert set(seen) == {torch.float32}
