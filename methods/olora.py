"""O-LoRA: orthogonal subspace learning (Wang et al. 2023, "Orthogonal Subspace Learning for
Language Model Continual Learning"; TRACE's ``model/Regular/O_LoRA.py``).

IncLoRA's adapters (methods/inclora.py: a new one per task, the earlier ones frozen, all summed),
with task t's adapter pushed into a subspace orthogonal to the earlier ones:

    L = L_task + lambda_1 * sum_{layers} sum_{i < t} sum_{j,k} |(A_i A_t^T)_{jk}|
               + lambda_2 * sum_{theta in (A_t, B_t)} ||theta||_2

as TRACE computes it (``torch.abs(torch.mm(A_old, A_new.T)).sum()`` over the concatenation of the
earlier A's, which is the sum over them; the norm of each new matrix, not squared). The paper writes
the orthogonality term with squares: ``orthogonality: square``. lambda_1 = 0.5, lambda_2 = 0
(TRACE's and the paper's defaults).

The terms depend on the new adapter's weights alone, so their gradient is closed-form; it is added
once per optimizer step to the new adapter's gradient (``edit_gradients``), which is what the
loss's terms add over a step's micro-batches (1 / accumulation each):

    d/dA_t sum |A_i A_t^T| = sum_i sign(A_i A_t^T)^T A_i      (square: 2 (A_i A_t^T)^T A_i)
    d/dtheta ||theta||_2  = theta / ||theta||                  (0 at theta = 0)

The earlier A matrices are frozen for the task and taken whole once at its start; the new ones
whole at each step (gathered under FSDP, where each process adds its rows of the result). The
terms' values are logged (``olora/orthogonality``, ``olora/l2``); the logged ``train/loss`` is the
task loss alone.
"""

from __future__ import annotations

import torch

from cl_bench.errors import check_choice, check_number
from cl_bench.training.parameter_views import ParameterViews
from methods.inclora import IncLoRA

ORTHOGONALITY = ("abs", "square")


class OLoRA(IncLoRA):
    name = "olora"

    def __init__(self, lambda_1: float = 0.5, lambda_2: float = 0.0, orthogonality: str = "abs", seed: int = 0) -> None:
        super().__init__(seed)
        check_number(lambda_1, "method.lambda_1", low=0)
        check_number(lambda_2, "method.lambda_2", low=0)
        self.lambda_1, self.lambda_2 = lambda_1, lambda_2
        self.orthogonality = check_choice(orthogonality, ORTHOGONALITY, "method.orthogonality")
        #: per LoRA layer: the earlier adapters' A matrices, whole, taken at the task's start
        self.frozen_a: list[torch.Tensor | None] = []

    def on_train_start(self, trainer, pl_module) -> None:
        """The earlier adapters' A matrices, frozen for the task, taken whole once per task and
        concatenated per layer as TRACE's ``A_old``."""
        views = ParameterViews(pl_module.model)
        self.frozen_a = [
            torch.cat([views.whole(layer.lora_A[name].weight) for name in self.adapters[:-1]])
            if len(self.adapters) > 1
            else None
            for layer in self.lora_layers()
        ]

    @torch.no_grad()
    def edit_gradients(self, module, views) -> None:
        """The terms' gradient on the new adapter's gradient."""
        new = self.adapters[-1]
        orth, l2 = [], []
        for layer, a_old in zip(self.lora_layers(), self.frozen_a):
            a_param = layer.lora_A[new].weight
            a_new = views.whole(a_param)
            if a_old is not None and self.lambda_1 > 0:
                overlap = a_old @ a_new.T  # sum_i |A_i A_t^T| = |A_old A_t^T| over the concatenation
                if self.orthogonality == "abs":
                    orth.append(overlap.abs().sum())
                    add_gradient(views, a_param, overlap.sign().T @ a_old, self.lambda_1)
                else:
                    orth.append(overlap.square().sum())
                    add_gradient(views, a_param, 2 * overlap.T @ a_old, self.lambda_1)
            if self.lambda_2 > 0:
                for param in (a_param, layer.lora_B[new].weight):
                    whole = a_new if param is a_param else views.whole(param)
                    norm = whole.norm(p=2)
                    l2.append(norm)
                    if norm > 0:
                        add_gradient(views, param, whole / norm, self.lambda_2)
        if module.should_log:
            module.log_metrics({f"{self.name}/orthogonality": float(sum(orth)), f"{self.name}/l2": float(sum(l2))})


def add_gradient(views: ParameterViews, param: torch.Tensor, grad: torch.Tensor, weight: float) -> None:
    """``param.grad += weight * grad`` (``grad`` whole) on the rows of it this process holds."""
    held = views.grad(param)
    if held is not None:
        held.add_(views.rows(param, grad).to(held.dtype), alpha=weight)
