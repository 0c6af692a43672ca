"""A-GEM: the projection, the reference gradient under accumulation, the memory."""

from functools import partial

import pytest
import torch

from cl_bench.data.loaders import TaskLoaders
from cl_bench.data.tasks import Example, Task, TaskSpec
from cl_bench.errors import ConfigError
from cl_bench.models import tiny_llama
from cl_bench.training.module import CLModule
from cl_bench.training.parameter_views import ParameterViews
from tests.conftest import tiny_module, tiny_task

TASK = tiny_task(two_word_answers=True)


def _agem_step(micro_batch_size):
    """The projected gradient of one step of task 2, the step's gradient accumulated over
    micro-batches as Lightning does (each micro-batch loss / accumulate); the step ascends the
    loss of similar data, so it conflicts with the memory's gradient."""
    from methods.agem import AGEM

    method = AGEM(per_task=6, memory_batch_size=4, seed=1)
    module = tiny_module(method, seed=2, micro_batch_size=micro_batch_size)
    module.log_every_n_steps = 1
    method.on_stream_start(module, None)
    method.on_task_end(module, TASK, 0)
    second = Task(TaskSpec("u", "accuracy", 4), {"train": [Example(f"u{i} y? Answer:", f"z{i}") for i in range(4)]}, 1)
    micro = list(module.loaders.training(second.train, seed=0))
    for batch in micro:
        from cl_bench.training.lm import causal_lm_loss

        (-causal_lm_loss(module.model, batch) / len(micro)).backward()  # ascent: it conflicts with the memory
    step_grad = [p.grad.clone() for p in module.model.parameters()]
    views = ParameterViews(module.model)
    reference = method.reference_gradient(module, views, list(module.model.parameters()))
    assert all(torch.equal(p.grad, g) for p, g in zip(module.model.parameters(), step_grad))  # put back
    logged = {}
    module.metric_sink = lambda metrics, step: logged.update(metrics)
    method.edit_gradients(module, views)
    return module, method, step_grad, reference, [p.grad.clone() for p in module.model.parameters()], logged


def test_agem_projection_is_the_formula_and_removes_the_conflict():
    from methods.agem import project

    torch.manual_seed(0)
    g = [torch.randn(3, 4), torch.randn(5)]
    r = [-g[0] + 0.1 * torch.randn(3, 4), -g[1]]  # conflicting
    flat_g, flat_r = torch.cat([t.flatten() for t in g]), torch.cat([t.flatten() for t in r])
    dot, projected = project(g, r)
    assert projected and dot == pytest.approx((flat_g @ flat_r).item(), rel=1e-6)
    expected = flat_g - (flat_g @ flat_r) / (flat_r @ flat_r) * flat_r
    torch.testing.assert_close(torch.cat([t.flatten() for t in g]), expected)
    assert torch.cat([t.flatten() for t in g]) @ flat_r >= -1e-5
    aligned = [t.clone() for t in r]
    assert project(aligned, r)[1] is False and all(torch.equal(a, b) for a, b in zip(aligned, r))


def test_agem_step_projects_the_whole_gradient_and_is_the_same_under_accumulation():
    from cl_bench.training.lm import causal_lm_loss

    module, method, g, r, projected, logged = _agem_step(None)
    # the reference gradient is the token-mean loss gradient over the step's memory batch
    from cl_bench.rng import derive_seed
    from methods.shared.importance import sample_examples

    drawn = sample_examples(method.memory[0], 4, derive_seed(1, 0))
    module.model.zero_grad()
    batch = next(iter(TaskLoaders(module.loaders.tokenizer, 4, 64, 8).passes(drawn)))
    causal_lm_loss(module.model, {k: v for k, v in batch.items() if k != "loss_normalizer"}).backward()
    for ref, p in zip(r, module.model.parameters()):
        torch.testing.assert_close(ref, p.grad, rtol=1e-5, atol=1e-7)
    fg, fr = torch.cat([t.flatten() for t in g]), torch.cat([t.flatten() for t in r])
    dot = (fg @ fr).item()
    assert dot < 0
    expected = fg - dot / (fr @ fr) * fr
    torch.testing.assert_close(torch.cat([t.flatten() for t in projected]), expected, rtol=1e-5, atol=1e-6)
    assert logged["agem/memory_size"] == 6 and logged["agem/projected_fraction"] == 1.0
    _, _, g2, r2, projected2, _ = _agem_step(2)  # 2 micro-batches per step, for the task and the memory
    for a, b in zip(projected + r, projected2 + r2):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_agem_memory_is_seeded_and_restored_and_settings_are_checked():
    from methods.agem import AGEM

    method = AGEM(per_task=3, seed=4)
    module = tiny_module(method)
    method.on_stream_start(module, None)
    method.on_task_end(module, TASK, 0)
    assert len(method.memory[0]) == 3 and set(method.memory[0]) <= set(TASK.train)
    restored = AGEM(per_task=3, seed=4)
    restored.load_state_dict(method.state_dict())
    assert restored.memory == method.memory
    with pytest.raises(ConfigError, match="method.per_task must be an integer >= 1"):
        AGEM(per_task=0)
    bad = AGEM(memory_batch_size=6)
    with pytest.raises(ConfigError, match=r"method.memory_batch_size \(6\) must be laid out"):
        bad.on_stream_start(tiny_module(bad, micro_batch_size=4, batch_size=8), None)


def test_agem_memory_batches_leave_no_token_cache_entries(tmp_path):
    from methods.agem import AGEM

    method = AGEM(per_task=6, seed=1)
    bundle = tiny_llama(seed=0)
    loaders = TaskLoaders(bundle.tokenizer, batch_size=4, max_prompt_len=64, max_ans_len=8, cache_dir=tmp_path)
    module = CLModule(bundle.model, method, partial(torch.optim.AdamW, lr=1e-3), loaders=loaders)
    method.on_stream_start(module, None)
    method.on_task_end(module, TASK, 0)
    for step in range(3):
        module.step_offset = step
        method.reference_gradient(module, ParameterViews(module.model), list(module.model.parameters()))
    assert list(tmp_path.iterdir()) == []
