"""EWC as TRACE implements it (Wang et al. 2023, TRACE; its ``model/Regular/EWC.py``), for
comparing with TRACE's numbers. The penalty is EWC's (methods/ewc.py), from the second task on,

    L = L_task + (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2,      lambda = 400,

but F is no Fisher pass after a task. It starts at zero, in the model's dtype, and after every
training micro-batch m, of every epoch of every task, grows by that micro-batch's gradient
(penalty included, as scaled for accumulation, NaN set to 0) squared over the task's number of
micro-batches per epoch L:

    F <- F + nan_to_num(g_m)^2 / L

It is never reset, so it grows with epochs and tasks, and the penalty uses it live (the current
task's micro-batches included). theta* is theta before the first task, then at the end of each
task. Each process keeps its own F from its own micro-batch gradients, as TRACE's processes do.
"""
from __future__ import annotations

from typing import Sequence

import torch

from methods.ewc import EWC


class TraceEWC(EWC):
    name = "ewc_trace"
    supported_strategies = ("single_device", "ddp")  # F from hooks on the parameters' gradients

    def __init__(self, lambda_: float = 400.0, param_patterns: Sequence[str] | None = None):
        super().__init__(lambda_=lambda_, param_patterns=param_patterns, shard_state=False)
        #: F and theta*, live: the penalty reads them as they are updated
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        #: micro-batches per epoch of the current task (TRACE's len(train_dataloader))
        self.batches_per_epoch = 1

    def on_stream_start(self, module, stream) -> None:
        params = self._params(module)
        self.fisher = {n: torch.zeros_like(p, memory_format=torch.contiguous_format) for n, p in params.items()}
        self.anchor = {n: p.detach().clone() for n, p in params.items()}

    def on_task_start(self, module, task, task_index: int) -> None:
        self.consolidated = [(self.fisher, self.anchor)] if task_index > 0 else []
        self.handles = [p.register_hook(self._square_hook(n, p)) for n, p in self._params(module).items()]

    def on_train_start(self, trainer, pl_module) -> None:
        self.batches_per_epoch = max(int(trainer.num_training_batches), 1)
        super().on_train_start(trainer, pl_module)

    def place_state(self, device: torch.device) -> None:
        self.fisher = {n: f.to(device) for n, f in self.fisher.items()}
        self.anchor = {n: a.to(device) for n, a in self.anchor.items()}
        self.consolidated = [(self.fisher, self.anchor)] if self.consolidated else []

    def _square_hook(self, name: str, p: torch.nn.Parameter):
        def hook(grad):
            if self.consolidated:  # the penalty's gradient, from F as it is before this micro-batch
                grad = grad.clone()  # a hook must not edit its argument
                self._add_penalty_grad(grad, name, p)
            self.fisher[name].add_(torch.nan_to_num(grad.detach(), nan=0.0).square() / self.batches_per_epoch)
            return grad
        return hook

    def on_task_end(self, module, task, task_index: int) -> None:
        self.release_hooks()
        self.anchor = {n: p.detach().clone() for n, p in self._params(module).items()}
        self.consolidated = []

    def state_dict(self):
        return {"fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state_dict) -> None:
        self.fisher, self.anchor = state_dict["fisher"], state_dict["anchor"]
