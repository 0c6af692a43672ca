"""EWC as TRACE implements it (Wang et al. 2023, TRACE; its ``model/EWC.py``), for comparing with
TRACE's numbers. The penalty is EWC's (methods/ewc.py),

    L = L_task + (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2,      lambda = 400,

but F is not a Fisher pass after the task: it is the running mean of the squared gradients of
every training micro-batch since the stream began (penalty included), never reset,

    F = (1/M) sum_{m <= M} g_m^2,

and the anchor theta* is theta at the end of the latest task. The squares are taken by a tensor
hook on each micro-batch's own gradient; the state is kept whole on every process (no sharding).
"""
from __future__ import annotations

from typing import Sequence

import torch

from methods.ewc import EWC


class TraceEWC(EWC):
    name = "ewc_trace"

    def __init__(self, lambda_: float = 400.0, storage_dtype: str = "float32",
                 param_patterns: Sequence[str] | None = None):
        super().__init__(lambda_=lambda_, storage_dtype=storage_dtype, param_patterns=param_patterns, shard_state=False)
        #: running sum of squared micro-batch gradients, and the number of micro-batches in it
        self.grad_sq: dict[str, torch.Tensor] = {}
        self.micro_batches = 0

    def on_task_start(self, module, task, task_index: int) -> None:
        params = self._params(module)
        if not self.grad_sq:
            self.grad_sq = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        self.handles = [p.register_hook(self._square_hook(n, p)) for n, p in params.items()]

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.grad_sq = {n: g.to(pl_module.device) for n, g in self.grad_sq.items()}

    def _square_hook(self, name: str, p: torch.nn.Parameter):
        def hook(grad):
            if self.consolidated:
                grad = grad.clone()  # a hook must not edit its argument
                self._add_penalty_grad(grad, name, p)
            self.grad_sq[name].add_(grad.detach().float().square())
            return grad
        return hook

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.micro_batches += 1

    def on_task_end(self, module, task, task_index: int) -> None:
        self._params(module)
        anchor = self.release_hooks()
        fisher = {n: (g / max(self.micro_batches, 1)).to(self.dtype) for n, g in self.grad_sq.items()}
        self.consolidated = [(fisher, anchor)]

    def state_dict(self):
        return {**super().state_dict(), "grad_sq": self.grad_sq, "micro_batches": self.micro_batches}

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self.grad_sq = state_dict["grad_sq"]
        self.micro_batches = state_dict["micro_batches"]
