"""The diagonal Fisher against brute force, and its lack of side effects."""

import pytest
import torch

from cl_bench.data.loaders import TaskLoaders
from cl_bench.data.tasks import Example
from cl_bench.data.tokenization import Collator, encode_train
from cl_bench.errors import ConfigError
from cl_bench.models import tiny_llama
from methods.shared.importance import diagonal_fisher

EXAMPLES = [Example(f"question {i} about item{i * 7}? Answer:", f"ans {i % 3}") for i in range(7)]


@pytest.fixture
def tiny():
    return tiny_llama(seed=3)


def _loader(tok, batch_size=3):
    return TaskLoaders(tok, batch_size=batch_size, max_prompt_len=64, max_ans_len=8).passes(EXAMPLES)


def _sum_loglik(model, tok, examples):
    """Brute force: mean over ``examples`` of the summed answer log-likelihood, each sequence unpadded."""
    total = 0.0
    for ex in examples:
        batch = Collator(tok.pad_token_id)([encode_train(tok, ex, 64, 8)])
        n = (batch["labels"][:, 1:] != -100).sum()
        total = total - model(input_ids=batch["input_ids"], labels=batch["labels"]).loss * n
    return total / len(examples)


def _squared_grad(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    out = {n: p.grad.detach().square() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def test_per_sample_fisher_is_the_mean_of_per_example_squared_gradients(tiny):
    model, tok = tiny.model, tiny.tokenizer
    fisher, stats = diagonal_fisher(model, _loader(tok), dict(model.named_parameters()), "per_sample", num_samples=5)
    assert stats["samples"] == 5
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for ex in EXAMPLES[:5]:
        for n, g2 in _squared_grad(model, _sum_loglik(model.eval(), tok, [ex])).items():
            expected[n] += g2 / 5
    for n in expected:
        torch.testing.assert_close(fisher[n], expected[n], rtol=2e-4, atol=1e-9)


def test_batch_fisher_is_the_mean_of_squared_batch_gradients(tiny):
    model, tok = tiny.model, tiny.tokenizer
    fisher, _ = diagonal_fisher(model, _loader(tok, 3), dict(model.named_parameters()), "batch", num_samples=512)
    batches = [EXAMPLES[0:3], EXAMPLES[3:6], EXAMPLES[6:7]]
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for chunk in batches:
        for n, g2 in _squared_grad(model, _sum_loglik(model.eval(), tok, chunk)).items():
            expected[n] += g2 / len(batches)
    for n in expected:
        torch.testing.assert_close(fisher[n], expected[n], rtol=2e-4, atol=1e-9)


def test_the_pass_changes_no_weight_gradient_mode_or_optimizer_state(tiny):
    model, tok = tiny.model, tiny.tokenizer
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(**{k: v for k, v in next(iter(_loader(tok))).items()}).loss
    loss.backward()
    opt.step()  # the optimizer now has state, and .grad holds the last gradient
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    state = {k: {s: v.clone() for s, v in st.items() if torch.is_tensor(v)} for k, st in opt.state.items()}
    for mode in ("per_sample", "batch"):
        diagonal_fisher(model, _loader(tok), dict(model.named_parameters()), mode, num_samples=4)
    assert model.training
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]) and torch.equal(p.grad, grads[n])
    for k, st in opt.state.items():
        assert all(torch.equal(v, state[k][s]) for s, v in st.items() if torch.is_tensor(v))


def test_bad_arguments(tiny):
    params = dict(tiny.model.named_parameters())
    with pytest.raises(ConfigError, match="method.num_samples must be an integer >= 1"):
        diagonal_fisher(tiny.model, [], params, "batch", num_samples=0)
    with pytest.raises(ConfigError, match="method.fisher must be one of"):
        diagonal_fisher(tiny.model, [], params, "exact", num_samples=4)
