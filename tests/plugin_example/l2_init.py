"""A complete method added the documented way: this file plus method/l2_init.yaml beside it.

L2-init: L = L_task + (weight / 2) * ||theta - theta_0||^2, theta_0 = the weights before the stream.
"""

import torch

from cl_bench.errors import check_number
from methods.base import CLMethod


class L2Init(CLMethod):
    name = "l2_init"

    def __init__(self, weight: float = 0.1):
        self.weight = check_number(weight, "method.weight", low=0)
        self.initial: dict[str, torch.Tensor] = {}
        self.penalties: list[float] = []

    def on_stream_start(self, module, stream):
        self.initial = {n: p.detach().clone() for n, p in module.model.named_parameters()}

    def penalty(self, module, batch, task_loss):
        total = sum(((p - self.initial[n]) ** 2).sum() for n, p in module.model.named_parameters())
        penalty = 0.5 * self.weight * total
        self.penalties.append(penalty.item())
        return penalty
