"""GEM: gradient episodic memory (Lopez-Paz & Ranzato, NeurIPS 2017), as the authors' code does it
(facebookresearch/GradientEpisodicMemory, model/gem.py: ``observe`` and ``project2cone2``).

After each task, ``per_task`` seeded training examples of it form that task's episodic memory. At
every optimizer step of a later task, the gradient g_k of the task loss on each earlier task k's
memory (a batch of ``memory_batch_size`` examples of it, drawn per step as A-GEM draws; null: a
training batch's size; the authors use the whole memory, ``memory_batch_size`` = ``per_task``, t
times a batch's cost on an LLM) is computed at the current weights. If any g . g_k < 0, g is
replaced by the solution of the dual QP the authors solve with quadprog:

    v* = argmin_v  1/2 v^T (G G^T + eps I) v + (G g)^T v    subject to  v >= margin
    g  <- G^T v* + g                                          (G: the rows g_k)

over all trainable parameters at once (``scope: model``), or per parameter tensor as TRACE's
model/Regular/GEM.py projects (``scope: tensor``). margin (the authors' ``memory_strength``) 0.5
and eps 1e-3 are the authors' defaults. The memory gradients are A-GEM's reference gradient, one per
earlier task (methods/agem.py): laid out over processes and micro-batches as a training batch,
averaged over processes (DDP), reduce-scattered into each process's rows (FSDP), where the dot
products are summed over the processes' rows; every process solves the same QP and updates its rows.
"""

from __future__ import annotations

import numpy as np
import quadprog
import torch

from cl_bench.errors import check_choice, check_number
from cl_bench.rng import derive_seed
from methods.agem import AGEM, dot_product
from methods.base import trainable_bytes

SCOPES = ("model", "tensor")


def solve_dual(gram: np.ndarray, dots: np.ndarray, margin: float, eps: float) -> np.ndarray:
    """The authors' ``project2cone2`` QP: v = argmin 1/2 v^T P v - q^T v subject to v >= margin
    (quadprog's ``solve_qp(P, q, I, margin)``), P = sym(gram) + eps I, q = -dots, gram the memory
    gradients' Gram matrix and dots their products with the step's gradient (float64)."""
    t = gram.shape[0]
    p = 0.5 * (gram + gram.T) + np.eye(t) * eps
    return quadprog.solve_qp(p, -dots, np.eye(t), np.zeros(t) + margin)[0]


class GEM(AGEM):
    name = "gem"

    def __init__(
        self,
        per_task: int = 100,
        memory_batch_size: int | None = None,
        margin: float = 0.5,
        eps: float = 1e-3,
        scope: str = "model",
        seed: int = 0,
    ):
        super().__init__(per_task=per_task, memory_batch_size=memory_batch_size, seed=seed)
        self.margin = float(check_number(margin, "method.margin", low=0))
        self.eps = float(check_number(eps, "method.eps", low=0, low_open=True))
        self.scope = check_choice(scope, SCOPES, "method.scope")

    def memory_gradients(self, module, views, params) -> list[list[torch.Tensor]]:
        """g_k for every earlier task k, as the views of ``params`` hold it."""
        with module.precision_context():
            return [
                self.reference_gradient(
                    module,
                    views,
                    params,
                    self.memory_batches(module, kept, derive_seed(derive_seed(self.seed, k), module.stream_step)),
                )
                for k, kept in enumerate(self.memory)
            ]

    def edit_gradients(self, module, views) -> None:
        if not self.memory:
            return
        params = [p for p in views.parameters().values() if p.grad is not None]
        memories = self.memory_gradients(module, views, params)
        groups = [list(range(len(params)))] if self.scope == "model" else [[i] for i in range(len(params))]
        projected = 0
        for group in groups:
            g = [views.grad(params[i]) for i in group]
            rows = [[m[i] for i in group] for m in memories]
            dots = np.array([dot_product(g, r, views.total) for r in rows])
            if (dots < 0).sum() == 0:  # every process sees the same sums: all take the same branch
                continue
            gram = np.array([[dot_product(a, b, views.total) for b in rows] for a in rows])
            v = solve_dual(gram, dots, self.margin, self.eps)
            for j, grad in enumerate(g):
                update = sum(float(v[k]) * rows[k][j].to(grad.dtype) for k in range(len(rows)))
                grad.add_(update)
            projected += 1
        self.steps += 1
        self.projected_steps += projected > 0
        if module.should_log:
            module.log_metrics(
                {
                    "gem/projected_fraction": self.projected_steps / self.steps,
                    "gem/projected_groups": projected,
                    "gem/memory_size": sum(len(kept) for kept in self.memory),
                }
            )

    def planned_state(self, model, world, tasks):
        """One memory gradient per earlier task (its rows under FSDP) and a micro-batch's gradient."""
        share = world if self.row_shards else 1
        earlier = max(tasks - 1, 1)
        return {f"memory gradients ({earlier} earlier tasks)": earlier * trainable_bytes(model) // share}
