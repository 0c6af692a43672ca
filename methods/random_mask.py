"""Random-row masking: the control for an importance mask such as FGGM's.

The same fraction 1 - alpha of rows (or columns / entries) is trained as in FGGM, chosen uniformly
at random at the start of each task (seeded by ``seed`` and the task index), everything else
frozen for the task. If FGGM beats this, its Fisher ranking, not the amount of freezing, matters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cl_bench.rng import derive_seed
from methods.shared.fixed_mask import FixedMaskMethod


class RandomMask(FixedMaskMethod):
    name = "random_mask"
    scores_whole_tensors = True  # drawn from the shapes: no gradients, no gathering under FSDP

    def __init__(
        self,
        alpha: float = 0.7,
        aggregate: str = "row",
        quantile_scope: str = "global",
        skip_first_task: bool = True,
        param_patterns: Sequence[str] | None = None,
        seed: int = 0,
        vectors: str = "mask",
    ):
        super().__init__(
            alpha=alpha,
            aggregate=aggregate,
            quantile_scope=quantile_scope,
            update="top",
            skip_first_task=skip_first_task,
            param_patterns=param_patterns,
            vectors=vectors,
        )
        self.seed = seed

    def scores(self, module, task, params):
        """Uniform scores per aggregated unit (row, column or entry), spread over its entries so
        that aggregation gives back exactly that uniform draw whatever the tensor's width."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.task_index))
        out = {}
        for n, p in params.items():
            if p.dim() == 2 and self.aggregate == "row":
                s = torch.rand(p.shape[0], 1, generator=g).expand(p.shape) / p.shape[1]
            elif p.dim() == 2 and self.aggregate == "column":
                s = torch.rand(1, p.shape[1], generator=g).expand(p.shape) / p.shape[0]
            else:
                s = torch.rand(p.shape, generator=g)
            out[n] = s.to(p.device)
        return out
