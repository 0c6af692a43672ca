"""Task arithmetic (Ilharco et al., ICLR 2023), merged after every task as fusion_bench's continual
version does (fusion_bench/method/opcm/task_arithmetic.py).

Each task is fine-tuned from the pretrained weights theta_0 (independent fine-tuning); after task t

    tau_t   = theta_t - theta_0
    theta^(t) = theta^(t-1) + lambda * tau_t,   theta^(0) = theta_0
              = theta_0 + lambda * sum_{i <= t} tau_i

is evaluated and kept. lambda (``scaling``) is fixed, 0.3 as in fusion_bench's config (the paper
picks it on held-out validation data; its repository hard-codes 0.8 for addition).
"""

from __future__ import annotations

import torch

from cl_bench.errors import check_number
from methods.shared.merging import MergingMethod


class TaskArithmetic(MergingMethod):
    name = "task_arithmetic"
    starts_from = "pretrained"
    per_entry = ("merged",)
    host_copies = 2  # theta_0 and theta^(t)

    def __init__(self, scaling: float = 0.3):
        super().__init__()
        self.scaling = float(check_number(scaling, "method.scaling", low=0))
        #: theta^(t), the running merge (empty before the first task)
        self.merged: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def fold(self, module, views, params, tuned, vector, task, t):
        start = self.merged or self.pretrained
        self.merged = {n: start[n] + self.scaling * vector[n] for n in vector}
        return self.merged
