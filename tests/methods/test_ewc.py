"""EWC, MAS and TRACE's EWC: importances, penalties and their gradients against direct
computations on the tiny model."""

from types import SimpleNamespace

import pytest
import torch

from cl_bench.models import tiny_llama
from cl_bench.training.lm import causal_lm_loss
from cl_bench.training.parameter_views import ParameterViews
from methods.ewc import EWC
from methods.ewc_trace import TraceEWC
from methods.mas import MAS
from tests.conftest import tiny_module, tiny_task

TASK = tiny_task()


def _consolidate_random(method, module, seed=0):
    """Give ``method`` a random Fisher and an anchor near the current weights."""
    params = dict(module.model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    fisher = {n: torch.rand(p.shape, generator=g) for n, p in params.items()}
    anchor = {n: p.detach() + torch.randn(p.shape, generator=g) * 0.1 for n, p in params.items()}
    method.consolidated = [(fisher, anchor)]
    return params, fisher, anchor


def _trace_ewc_reference(model, tasks, lam, accumulate, lr):
    """TRACE's model/Regular/EWC.py loop, restated: autograd penalty with the live F, a hook that
    keeps each micro-batch's gradient (NaN -> 0), F += g^2 / len(dataloader) after every micro-batch."""
    params = dict(model.named_parameters())
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    previous = {n: p.detach().clone() for n, p in params.items()}
    grads = {}
    for n, p in params.items():
        p.register_hook(lambda g, n=n: grads.__setitem__(n, torch.nan_to_num(g, nan=0)))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for task_num, batches in enumerate(tasks):
        for i, batch in enumerate(batches):
            loss = causal_lm_loss(model, batch)
            if task_num != 0:
                loss = loss + 0.5 * lam * sum((fisher[n] * (p - previous[n]) ** 2).sum() for n, p in params.items())
            (loss / accumulate).backward()  # DeepSpeed's backward scales by the accumulation too
            for n in params:
                fisher[n] += grads[n] ** 2 / len(batches)
            if (i + 1) % accumulate == 0:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        previous = {n: p.detach().clone() for n, p in params.items()}
    return fisher


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ewc_adds_lambda_f_times_distance_to_the_step_gradient(accumulate):
    method = EWC(lambda_=3.0)
    module = tiny_module(method)
    method.on_stream_start(module, None)
    params, fisher, anchor = _consolidate_random(method, module)
    batches = list(module.pass_loader(TASK.train))[:accumulate]
    for batch in batches:  # the task gradient alone, as Lightning scales it under accumulation
        (causal_lm_loss(module.model, batch) / accumulate).backward()
    task_grad = {n: p.grad.clone() for n, p in params.items()}
    module.model.zero_grad(set_to_none=True)
    method.on_task_start(module, TASK, 1)
    method.on_train_start(SimpleNamespace(accumulate_grad_batches=accumulate), module)
    for batch in batches:
        (causal_lm_loss(module.model, batch) / accumulate).backward()
    method.edit_gradients(module, ParameterViews(module.model))  # once, after the micro-batches
    for n, p in params.items():
        torch.testing.assert_close(p.grad, task_grad[n] + 3.0 * fisher[n] * (p.detach() - anchor[n]))


def test_ewc_logs_the_penalty_value_and_adds_no_graph():
    method = EWC(lambda_=3.0)
    module = tiny_module(method)
    logged = []
    module.metric_sink = lambda metrics, step: logged.append(metrics)
    method.on_stream_start(module, None)
    params, fisher, anchor = _consolidate_random(method, module)
    assert method.penalty(module, None, torch.tensor(2.0)) is None
    expected = 0.5 * 3.0 * sum((fisher[n] * (p.detach() - anchor[n]) ** 2).sum().item() for n, p in params.items())
    assert logged[-1]["ewc/penalty"] == pytest.approx(expected, rel=1e-5)
    assert logged[-1]["ewc/penalty_to_task_loss"] == pytest.approx(expected / 2.0, rel=1e-5)


@pytest.mark.parametrize("mode", ["online", "separate"])
def test_ewc_consolidation_online_decays_and_sums_separate_keeps_each_task(mode, monkeypatch):
    method = EWC(mode=mode, gamma=0.5)
    module = tiny_module(method)
    fishers = iter(
        [
            {n: torch.full_like(p, 2.0) for n, p in module.model.named_parameters()},
            {n: torch.full_like(p, 3.0) for n, p in module.model.named_parameters()},
        ]
    )
    monkeypatch.setattr("methods.ewc.diagonal_fisher", lambda *a, **k: (next(fishers), {"seconds": 0.0}))
    method.on_task_end(module, TASK, 0)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(1.0)
    method.on_task_end(module, TASK, 1)
    name, p = next(iter(module.model.named_parameters()))
    if mode == "online":
        assert len(method.consolidated) == 1
        fisher, anchor = method.consolidated[0]
        assert torch.all(fisher[name] == 0.5 * 2.0 + 3.0) and torch.equal(anchor[name], p.detach())
    else:
        assert [f[name].unique().item() for f, _ in method.consolidated] == [2.0, 3.0]
        assert torch.equal(method.consolidated[0][1][name] + 1.0, method.consolidated[1][1][name])


def test_ewc_trace_matches_a_restatement_of_traces_loop():
    lam, accumulate, lr = 400.0, 2, 0.05
    reference_model = tiny_llama(seed=0).model
    method = TraceEWC(lambda_=lam)
    module = tiny_module(method)
    model = module.model
    batches = list(module.pass_loader(TASK.train))[:2] * 2  # 4 micro-batches, 2 optimizer steps per task
    tasks = [batches, batches]  # the penalty acts from task 2's second step on (moves weights by ~0.2 here)
    expected = _trace_ewc_reference(reference_model, tasks, lam, accumulate, lr)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    method.on_stream_start(module, None)
    for task_index, task_batches in enumerate(tasks):
        method.on_task_start(module, TASK, task_index)
        method.on_train_start(
            SimpleNamespace(accumulate_grad_batches=accumulate, num_training_batches=len(task_batches)), module
        )
        for i, batch in enumerate(task_batches):
            (causal_lm_loss(model, batch) / accumulate).backward()
            if (i + 1) % accumulate == 0:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        method.on_task_end(module, TASK, task_index)
    for n, p in reference_model.named_parameters():
        torch.testing.assert_close(method.fisher[n], expected[n], rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(model.get_parameter(n), p, rtol=1e-4, atol=1e-7)
    assert any(f.abs().sum() > 0 for f in method.fisher.values())


def test_mas_importance_equals_brute_force_per_example_output_gradients():
    from cl_bench.data.tokenization import IGNORE_INDEX, encode_train
    from methods.shared.importance import output_sensitivity

    bundle = tiny_llama(seed=1)
    model = bundle.model
    module = tiny_module(MAS())
    params = dict(model.named_parameters())
    got, stats = output_sensitivity(model, module.loaders.passes(TASK.train), params, num_samples=None)
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for ex in TASK.train:  # one example at a time, no padding, the full logits
        item = encode_train(bundle.tokenizer, ex, 64, 8)
        ids, labels = torch.tensor([item["input_ids"]]), torch.tensor([item["labels"]])
        logits = model(input_ids=ids).logits[0, :-1]
        predicts_answer = labels[0, 1:] != IGNORE_INDEX
        model.zero_grad()
        logits[predicts_answer].square().sum().backward()
        for n, p in params.items():
            expected[n] += p.grad.abs() / len(TASK.train)
    assert stats["samples"] == len(TASK.train)
    for n in params:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6)


def test_mas_penalty_is_lambda_omega_times_squared_distance():
    method = MAS(lambda_=3.0)
    module = tiny_module(method)
    method.on_stream_start(module, None)
    params, omega, anchor = _consolidate_random(method, module)
    batch = list(module.pass_loader(TASK.train))[0]
    causal_lm_loss(module.model, batch).backward()
    task_grad = {n: p.grad.clone() for n, p in params.items()}
    module.model.zero_grad(set_to_none=True)
    method.on_task_start(module, TASK, 1)
    method.on_train_start(SimpleNamespace(accumulate_grad_batches=1), module)
    causal_lm_loss(module.model, batch).backward()
    views = ParameterViews(module.model)
    method.edit_gradients(module, views)
    for n, p in params.items():
        torch.testing.assert_close(p.grad, task_grad[n] + 2 * 3.0 * omega[n] * (p.detach() - anchor[n]))
    expected = 3.0 * sum((omega[n] * (p.detach() - anchor[n]) ** 2).sum().item() for n, p in params.items())
    assert method.penalty_value(views) == pytest.approx(expected, rel=1e-5)
