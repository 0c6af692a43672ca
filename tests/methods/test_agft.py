"""AGFT: LRP-epsilon relevance, the top-K mean, and the gate on gradients and updates."""

import pytest
import torch

from cl_bench.data.loaders import TaskLoaders
from cl_bench.data.tasks import Example, Task, TaskSpec
from cl_bench.data.tokenization import IGNORE_INDEX
from cl_bench.errors import ConfigError
from cl_bench.training.lm import labelled_logits
from cl_bench.training.parameter_views import ParameterViews
from methods.shared.masking import select_parameters
from tests.conftest import tiny_module, tiny_task

TASK = tiny_task(two_word_answers=True)


def _brute_force_lrp(w1, w2, x, picks, eps):
    """LRP-epsilon relevance of the weights of relu(x W1^T) W2^T for sum_t z2[t, picks[t]], layer
    by layer with the textbook rule R_i = sum_j x_i w_ji / (z_j + eps sign z_j) R_j."""

    def stab(z):
        return z + eps * torch.where(z >= 0, 1.0, -1.0)

    z1 = x @ w1.T
    a1 = z1.clamp(min=0)
    z2 = a1 @ w2.T
    r2 = torch.zeros_like(z2)
    r2[torch.arange(len(picks)), picks] = z2[torch.arange(len(picks)), picks]
    c2 = r2 / stab(z2)  # [T, d2]
    rw2 = torch.einsum("tj,ji,ti->ji", c2, w2, a1)  # relevance of each W2 entry, summed over tokens
    ra1 = a1 * (c2 @ w2)  # relevance of the hidden units
    c1 = ra1 / stab(z1)  # relu passes relevance unchanged: R(z1) = R(a1)
    rw1 = torch.einsum("tj,ji,ti->ji", c1, w1, x)
    return rw1, rw2


def _gated_module(scale):
    """An AGFT module after one task, its gate a known random field, ready to train task 2."""
    from methods.agft import AGFT

    method = AGFT(scale=scale, samples="all", num_samples=2, param_patterns=["*layers.0.self_attn.q_proj.weight"])
    module = tiny_module(method)
    method.on_stream_start(module, None)
    method.on_task_end(module, TASK, 0)
    first = dict(method.gate)
    assert all(0 <= g.min() and g.max() <= 1 for g in first.values())
    method.on_task_end(module, TASK, 1)  # the same task again: the running max keeps the larger entry
    for n in first:
        assert torch.equal(method.gate[n], torch.maximum(first[n], method.gate[n]))
    method.gate = {n: torch.rand_like(g) for n, g in method.gate.items()}
    return method, module


def _adam_updates(method, steps=5):
    """|theta - theta_0| of every gated entry after ``steps`` AdamW steps on TASK from the same start,
    with ``method``'s gate applied as a training run applies it (None: SFT)."""
    from types import SimpleNamespace

    from cl_bench.training.lm import causal_lm_loss

    module = tiny_module(method)
    name = "model.layers.0.self_attn.q_proj.weight"
    param = dict(module.model.named_parameters())[name]
    start = param.detach().clone()
    opt = torch.optim.AdamW(module.model.parameters(), lr=1e-3, weight_decay=0.0)
    if method.name == "agft":
        method.on_stream_start(module, None)
        method.gate = {name: torch.full_like(param, 0.5)}
        method.on_task_start(module, TASK, 1)
        method.on_train_start(SimpleNamespace(optimizers=[opt]), module)
    for batch in list(module.pass_loader(TASK.train))[:1] * steps:
        module.model.zero_grad(set_to_none=True)
        causal_lm_loss(module.model, batch).backward()
        method.edit_gradients(module, ParameterViews(module.model))
        opt.step()
    if method.name == "agft":
        method.on_train_end(None, module)
    return (param.detach() - start).abs()


@pytest.mark.parametrize("eps", [0.0, 0.5])
def test_agft_relevance_is_lrp_epsilon_on_a_tiny_relu_network(eps):
    from methods.agft import epsilon_rule, weight_relevance

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7, bias=False), torch.nn.ReLU(), torch.nn.Linear(7, 4, bias=False))
    x, picks = torch.randn(3, 5), torch.tensor([0, 2, 3])
    with epsilon_rule(net, eps):
        out = net(x)[torch.arange(3), picks].sum()
        got = weight_relevance(out, {"w1": net[0].weight, "w2": net[2].weight})
    rw1, rw2 = _brute_force_lrp(net[0].weight.detach(), net[2].weight.detach(), x, picks, eps)
    torch.testing.assert_close(got["w1"], rw1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["w2"], rw2, rtol=1e-5, atol=1e-6)
    if eps == 0:  # conservation: the weights' relevance of a layer sums to the output (no bias)
        assert got["w2"].sum().item() == pytest.approx(out.item(), rel=1e-5)


def test_agft_top_k_mean_and_the_per_sample_pass_match_a_direct_computation():
    from methods.agft import AGFT, TopKMean, epsilon_rule, weight_relevance

    torch.manual_seed(1)
    rows = torch.randn(7, 3, 2)
    top = TopKMean({"w": torch.Size([3, 2])}, 3, "cpu")
    for r in rows:
        top.add({"w": r})
    torch.testing.assert_close(top.mean()["w"], rows.sort(0, descending=True).values[:3].mean(0))
    method = AGFT(num_samples=8, top_k=3, samples="all", param_patterns=["*layers.0.mlp.*"])
    module = tiny_module(method)
    method.on_stream_start(module, None)
    params = select_parameters(module.model, method.param_patterns, "method.param_patterns")
    got, used = method.relevance(module, TASK.train[:4], params)
    assert used == 4
    model, expected = module.model.eval(), []
    for ex in TASK.train[:4]:  # each sample alone, no padding
        batch = next(iter(TaskLoaders(module.loaders.tokenizer, 1, 64, 8).passes([ex])))
        with epsilon_rule(model, 1e-6):
            logits, targets = labelled_logits(model, batch)
            rel = weight_relevance(logits.max(-1).values[targets != IGNORE_INDEX].sum(), params)
        expected.append({n: torch.log1p(r.abs() / r.abs().mean()) for n, r in rel.items()})
    for n in params:
        stacked = torch.stack([e[n] for e in expected]).sort(0, descending=True).values
        torch.testing.assert_close(got[n], stacked[:3].mean(0), rtol=1e-4, atol=1e-6)


def test_agft_scales_the_gradient_by_one_minus_the_gate():
    method, module = _gated_module("grad")
    batch = next(iter(module.pass_loader(TASK.train)))
    from cl_bench.training.lm import causal_lm_loss

    causal_lm_loss(module.model, batch).backward()
    plain = {n: p.grad.clone() for n, p in module.model.named_parameters()}
    module.model.zero_grad(set_to_none=True)
    method.on_task_start(module, TASK, 1)
    causal_lm_loss(module.model, batch).backward()
    method.edit_gradients(module, ParameterViews(module.model))
    for n, p in module.model.named_parameters():
        expected = plain[n] * (1 - method.gate[n]) if n in method.gate else plain[n]
        torch.testing.assert_close(p.grad, expected)


def test_agft_update_scaling_applies_one_minus_the_gate_to_the_optimizer_step():
    from types import SimpleNamespace

    method, module = _gated_module("update")
    name = next(iter(method.gate))
    param = dict(module.model.named_parameters())[name]
    batch = next(iter(module.pass_loader(TASK.train)))
    from cl_bench.training.lm import causal_lm_loss

    def step(scaled):
        module.model.load_state_dict(start)
        opt = torch.optim.AdamW(module.model.parameters(), lr=1e-2)
        if scaled:
            method.on_train_start(SimpleNamespace(optimizers=[opt]), module)
        module.model.zero_grad(set_to_none=True)
        causal_lm_loss(module.model, batch).backward()
        opt.step()
        method.on_train_end(None, module)
        return param.detach().clone()

    start = {k: v.clone() for k, v in module.model.state_dict().items()}
    before = start[name]
    plain, scaled = step(False), step(True)
    torch.testing.assert_close(scaled - before, (1 - method.gate[name]) * (plain - before), rtol=1e-5, atol=1e-8)


def test_agft_default_halves_the_adamw_update_of_an_entry_gated_at_one_half():
    """Issue 24.1: the default realises 'smaller updates' under AdamW; the literal gradient gate does
    not (Adam divides the scale away: the update is SFT's)."""
    from methods.agft import AGFT
    from methods.sft import SFT

    patterns = ["*layers.0.self_attn.q_proj.weight"]
    sft = _adam_updates(SFT())
    moved = sft > 1e-7
    default = _adam_updates(AGFT(param_patterns=patterns))
    literal = _adam_updates(AGFT(param_patterns=patterns, scale="grad"))
    assert (default[moved] / sft[moved]).median().item() == pytest.approx(0.5, abs=0.05)
    assert (literal[moved] / sft[moved]).median().item() == pytest.approx(1.0, abs=0.02)


def test_agft_counts_the_samples_that_formed_each_task_and_warns_when_none_did(caplog):
    """Issue 24.1: a task whose samples are never right at every token adds no gate, silently no more:
    the count is logged and reported; a looser token criterion or the task's scorer admits samples."""
    import logging

    from methods.agft import AGFT

    patterns = ["*layers.0.mlp.down_proj.weight"]
    strict = AGFT(num_samples=4, param_patterns=patterns)
    module = tiny_module(strict)
    strict.on_stream_start(module, None)
    with caplog.at_level(logging.WARNING):
        strict.on_task_end(module, TASK, 0)  # the untrained tiny model predicts no answer right
    assert (
        strict.report() == {"relevance_samples": {"t": 0}}
        and not strict.gate["model.layers.0.mlp.down_proj.weight"].any()
    )
    assert "none of the 4 samples examined of task t" in caplog.text and "method.samples=scored" in caplog.text
    model = module.model.eval()
    shares = []
    for ex in TASK.train[:8]:
        logits, targets = labelled_logits(model, next(iter(module.pass_loader([ex]))))
        shares.append(((logits.argmax(-1) == targets)[targets != IGNORE_INDEX]).float().mean().item())
    loose = AGFT(num_samples=8, min_token_accuracy=0.0, param_patterns=patterns)
    loose.on_stream_start(module, None)
    loose.on_task_end(module, TASK, 0)
    assert loose.report()["relevance_samples"]["t"] == sum(s >= 0.0 for s in shares) == 8
    restored = AGFT(param_patterns=patterns)
    restored.on_stream_start(module, None)
    restored.load_state_dict(loose.state_dict())
    assert restored.report() == loose.report()
    # samples=scored: each sample's greedy answer scored by the task's metric (accuracy: exact match)
    from cl_bench.evaluation.generation import GenerationConfig, generate

    answers = generate(
        model, module.loaders.tokenizer, TASK.train, 4, GenerationConfig(batch_size=1, max_prompt_len=64)
    )
    task = Task(
        TaskSpec("t", "accuracy", 4), {"train": [Example(ex.prompt, a) for ex, a in zip(TASK.train, answers)]}, 1
    )
    scored = AGFT(num_samples=8, samples="scored", min_score=100, param_patterns=patterns)
    scored.on_stream_start(module, None)
    scored.on_task_end(module, task, 0)  # every answer is the model's own: every sample scores 100
    assert scored.report()["relevance_samples"]["t"] == 8
    with pytest.raises(ConfigError, match="method.min_token_accuracy"):
        AGFT(min_token_accuracy=1.5)


def test_agft_gate_survives_a_checkpoint():
    from methods.agft import AGFT

    method, module = _gated_module("grad")
    restored = AGFT(param_patterns=["*layers.0.self_attn.q_proj.weight"])
    restored.on_stream_start(tiny_module(restored), None)
    restored.load_state_dict(method.state_dict())
    assert restored.gate.keys() == method.gate.keys()
    assert all(torch.equal(restored.gate[n], method.gate[n]) for n in method.gate)
