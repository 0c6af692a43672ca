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

Under FSDP (``trainer=fsdp``) the A and B matrices are row shards outside the forward pass, so the
term is not added to the loss: every process gathers the earlier A matrices once per task (frozen
then; r rows each) and the new adapter's at each optimizer step, and adds the term's closed-form
gradient to its rows of the new adapter's gradient,

    d/dA_t sum |A_i A_t^T| = sum_i sign(A_i A_t^T)^T A_i      (square: 2 (A_i A_t^T)^T A_i)
    d/dtheta ||theta||_2  = theta / ||theta||                  (0 at theta = 0)

once per step, which is what the loss's term adds over a step's micro-batches (1 / accumulation each).
"""
from __future__ import annotations

import torch

from cl_bench.errors import check_choice, check_number
from cl_bench.training.sharding import full_tensor, local, local_rows
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
        #: under FSDP, per LoRA layer: the earlier adapters' A matrices, gathered at the task's start
        self.frozen_a: list[torch.Tensor | None] = []

    def orthogonality_loss(self) -> torch.Tensor:
        """sum over LoRA layers and earlier adapters i of |A_i A_t^T| (entry-wise, summed)."""
        *old, new = self.adapters
        total = torch.zeros((), device=next(self.model.parameters()).device)
        for layer in self.lora_layers():
            a_new = layer.lora_A[new].weight
            for name in old:
                overlap = layer.lora_A[name].weight @ a_new.T
                total = total + (overlap.abs().sum() if self.orthogonality == "abs" else overlap.square().sum())
        return total

    def l2_loss(self) -> torch.Tensor:
        """sum of the L2 norms of the new adapter's matrices."""
        new = self.adapters[-1]
        norms = [m[new].weight.norm(p=2) for layer in self.lora_layers() for m in (layer.lora_A, layer.lora_B)]
        return torch.stack(norms).sum()

    def penalty(self, module, batch, task_loss):
        if self.upfront:  # FSDP: the term's gradient is added at the optimizer step
            return None
        orth = self.orthogonality_loss() if len(self.adapters) > 1 and self.lambda_1 > 0 else None
        l2 = self.l2_loss() if self.lambda_2 > 0 else None
        if module.should_log:
            module.log_metrics({f"{self.name}/orthogonality": 0.0 if orth is None else orth.item(),
                                f"{self.name}/l2": 0.0 if l2 is None else l2.item()})
        terms = [w * t for w, t in ((self.lambda_1, orth), (self.lambda_2, l2)) if t is not None]
        return sum(terms) if terms else None

    def on_train_start(self, trainer, pl_module) -> None:
        """Under FSDP: the earlier adapters' A matrices, frozen for the task, gathered once per
        task, concatenated per layer as TRACE's ``A_old``."""
        self.frozen_a = [torch.cat([full_tensor(layer.lora_A[name].weight) for name in self.adapters[:-1]])
                         if self.upfront and len(self.adapters) > 1 else None for layer in self.lora_layers()]

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        """Under FSDP: the term's gradient on this process's rows of the new adapter's gradient."""
        if not self.upfront:
            return
        new = self.adapters[-1]
        orth, l2 = [], []
        for layer, a_old in zip(self.lora_layers(), self.frozen_a):
            a_param = layer.lora_A[new].weight
            a_new = full_tensor(a_param)
            if a_old is not None and self.lambda_1 > 0:
                overlap = a_old @ a_new.T  # sum_i |A_i A_t^T| = |A_old A_t^T| over the concatenation
                if self.orthogonality == "abs":
                    orth.append(overlap.abs().sum())
                    add_rows(a_param, overlap.sign().T @ a_old, self.lambda_1)
                else:
                    orth.append(overlap.square().sum())
                    add_rows(a_param, 2 * overlap.T @ a_old, self.lambda_1)
            if self.lambda_2 > 0:
                for param in (a_param, layer.lora_B[new].weight):
                    whole = a_new if param is a_param else full_tensor(param)
                    norm = whole.norm(p=2)
                    l2.append(norm)
                    if norm > 0:
                        add_rows(param, whole / norm, self.lambda_2)
        if pl_module.should_log:
            pl_module.log_metrics({f"{self.name}/orthogonality": float(sum(orth)), f"{self.name}/l2": float(sum(l2))})


def add_rows(param: torch.Tensor, grad: torch.Tensor, weight: float) -> None:
    """``param.grad += weight * grad`` on this process's rows of it (``grad`` is whole)."""
    if param.grad is not None:
        local(param.grad).add_(grad[local_rows(param)].to(param.dtype), alpha=weight)
