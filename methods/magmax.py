"""MagMax (Marczak et al., ECCV 2024): sequential fine-tuning, then per entry the task-vector value
of largest magnitude (danielm1405/magmax, src/merging/task_vectors.py ``merge_max_abs``).

Task t is fine-tuned from theta_{t-1}, the previous task's fine-tuned weights (not the merge), so
every task vector tau_t = theta_t - theta_0 carries the tasks before it. After task t the tasks
seen so far are merged (the repository's ``evaluate_merged_fts``: ``task_vectors[:idx + 1]``):

    m_t = where(|tau_t| >= |m_{t-1}|, tau_t, m_{t-1}),   m_1 = tau_1   (a tie goes to the later task)
    theta^(t) = theta_0 + lambda * m_t

lambda (``scaling``) is 0.5, the repository's fixed coefficient (merge_splitted.py).
"""

from __future__ import annotations

import torch

from cl_bench.errors import check_number
from methods.shared.merging import MergingMethod


class MagMax(MergingMethod):
    name = "magmax"
    starts_from = "finetuned"
    per_entry = ("max_abs",)
    host_copies = 3  # theta_0, m_t and theta_t (where the next task starts)

    def __init__(self, scaling: float = 0.5):
        super().__init__()
        self.scaling = float(check_number(scaling, "method.scaling", low=0))
        #: m_t: per entry the task-vector value of largest magnitude so far
        self.max_abs: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def fold(self, module, views, params, tuned, vector, task, t):
        if not self.max_abs:
            self.max_abs = {n: v.clone() for n, v in vector.items()}
        else:
            self.max_abs = {
                n: torch.where(v.abs() >= self.max_abs[n].abs(), v, self.max_abs[n]) for n, v in vector.items()
            }
        return {n: self.pretrained[n] + self.scaling * m for n, m in self.max_abs.items()}
