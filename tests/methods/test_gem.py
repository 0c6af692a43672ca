"""GEM: the dual QP against a brute-force solution and against the authors' ``project2cone2``, the
step's edit against the authors' ``observe`` restated on the same memories, and its settings."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import quadprog
import torch

from cl_bench.data.tasks import Example, Task, TaskSpec
from cl_bench.errors import ConfigError
from cl_bench.training.lm import causal_lm_loss
from cl_bench.training.parameter_views import ParameterViews
from methods.gem import GEM, solve_dual
from tests.conftest import tiny_module, tiny_task


def brute_force_dual(p: np.ndarray, d: np.ndarray, margin: float) -> np.ndarray:
    """min 1/2 v^T P v + d^T v subject to v >= margin, by trying every set of free variables: the
    one whose solution is feasible and whose bound variables' gradients are >= 0 (KKT)."""
    t = len(d)
    for size in range(t + 1):
        for free in itertools.combinations(range(t), size):
            v = np.full(t, margin, dtype=float)
            bound = [i for i in range(t) if i not in free]
            if free:
                f = list(free)
                rhs = -d[f] - p[np.ix_(f, bound)] @ v[bound]
                v[f] = np.linalg.solve(p[np.ix_(f, f)], rhs)
            gradient = p @ v + d
            if (v >= margin - 1e-12).all() and (gradient[bound] >= -1e-10).all():
                return v
    raise AssertionError("no KKT point")


def authors_project2cone2(gradient: torch.Tensor, memories: torch.Tensor, margin=0.5, eps=1e-3) -> torch.Tensor:
    """The authors' ``project2cone2`` (facebookresearch/GradientEpisodicMemory 34c6b8e, model/gem.py),
    restated: in float64, the Gram matrix of the memory gradients (columns of ``memories``)
    symmetrised plus eps I, quadprog's ``solve_qp`` with linear term -(M g), constraints I v >= margin,
    and the gradient g + M^T v."""
    rows = memories.t().double().numpy()
    flat = gradient.reshape(-1).double().numpy()
    gram = rows @ rows.T
    gram = (gram + gram.T) / 2 + eps * np.eye(len(rows))
    v = quadprog.solve_qp(gram, -(rows @ flat), np.eye(len(rows)), np.full(len(rows), float(margin)))[0]
    return torch.from_numpy(v @ rows + flat)


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_the_dual_is_the_brute_force_solution_and_the_authors_projection(margin):
    rng = np.random.default_rng(0)
    for _ in range(20):
        t, n = rng.integers(1, 5), 12
        memories = rng.normal(size=(t, n))
        g = rng.normal(size=n) - memories.sum(axis=0)  # conflicting with some
        gram, dots = memories @ memories.T, memories @ g
        v = solve_dual(gram, dots, margin, 1e-3)
        np.testing.assert_allclose(v, brute_force_dual(gram + np.eye(t) * 1e-3, dots, margin), atol=1e-8)
        projected = v @ memories + g
        expected = authors_project2cone2(torch.tensor(g), torch.tensor(memories.T), margin, 1e-3).numpy()
        np.testing.assert_allclose(projected, expected, atol=1e-10)
        if margin == 0:  # the paper's constraint: no memory's loss goes up (to eps)
            assert (memories @ projected >= -1e-2 * np.abs(memories @ g).max()).all()


def _step(scope: str):
    """Task 3's first step after two tasks: the step ascends a loss like the memories', so it
    conflicts; returns the step's gradient, the memory gradients and the edited gradient."""
    method = GEM(per_task=4, scope=scope, seed=1)
    module = tiny_module(method, seed=2)
    method.on_stream_start(module, None)
    first = tiny_task(two_word_answers=True)
    second = Task(TaskSpec("u", "accuracy", 4), {"train": [Example(f"u{i} y? Answer:", f"z{i}") for i in range(8)]}, 1)
    method.on_task_end(module, first, 0)
    method.on_task_end(module, second, 1)
    third = [Example(f"q{i} x{i * 3}? Answer:", f"a{i} b{i % 2}") for i in range(4)]
    for batch in module.loaders.training(third, seed=0):
        (-causal_lm_loss(module.model, batch)).backward()
    params = list(module.model.parameters())
    step = [p.grad.clone() for p in params]
    memories = []
    for kept in method.memory:  # the authors: zero_grad, the loss on the task's whole memory, backward
        module.model.zero_grad()
        for batch in module.loaders.training(kept, seed=0):
            causal_lm_loss(module.model, batch).backward()
        memories.append(torch.cat([p.grad.flatten() for p in params]))
    for p, g in zip(params, step):
        p.grad = g.clone()
    method.edit_gradients(module, ParameterViews(module.model))
    return params, step, memories, [p.grad.clone() for p in params]


def test_a_gem_step_is_the_authors_observe_on_the_same_memories():
    params, step, memories, edited = _step("model")
    g = torch.cat([s.flatten() for s in step])
    m = torch.stack(memories, dim=1)
    assert (g @ m < 0).any()  # the conflict the QP resolves
    expected = authors_project2cone2(g, m).float()
    torch.testing.assert_close(torch.cat([e.flatten() for e in edited]), expected, rtol=1e-4, atol=1e-6)


def test_gem_per_tensor_projects_each_parameter_as_trace_does():
    """TRACE's GEM.py calls project2cone2 per parameter, on that parameter's memory rows."""
    params, step, memories, edited = _step("tensor")
    offset = 0
    for s, e in zip(step, edited):
        rows = torch.stack([m[offset : offset + s.numel()] for m in memories], dim=1)
        offset += s.numel()
        g = s.flatten()
        expected = authors_project2cone2(g, rows).float() if (g @ rows < 0).any() else g
        torch.testing.assert_close(e.flatten(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"margin": -1}, "method.margin"), ({"eps": 0}, "method.eps"), ({"scope": "layer"}, "method.scope")],
)
def test_bad_gem_settings_are_refused_by_key(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        GEM(**kwargs)
