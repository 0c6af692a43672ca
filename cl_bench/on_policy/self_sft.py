"""Self-SFT: supervised fine-tuning on the policy's own filtered samples (the middle baseline of
Chen et al. 2025, "Retaining by Doing", princeton-pli/retaining-by-doing).

For every prompt x of a micro-batch::

    sample y_1..y_G ~ pi(. | x)                 (as GRPO's rollouts)
    keep  {y_i : reward(x, y_i) >= threshold}   (the authors keep the correct ones: reward 1)
    L = token mean over the kept completions of -log pi(y_t | x, y_<t)      (the SFT loss)

The token mean runs over the kept tokens of every process's micro-batch (the count is summed over
the processes, as the SFT loss's normaliser is), so two processes train as one does.
"""

from __future__ import annotations

from typing import Any

import torch

from cl_bench.data.tokenization import IGNORE_INDEX
from cl_bench.distributed import sum_across_ranks, world_size
from cl_bench.errors import check_number
from cl_bench.on_policy.base import OnPolicy
from cl_bench.training.lm import labelled_logits


class SelfSFT(OnPolicy):
    name = "self_sft"

    def __init__(self, threshold: float = 1.0, **on_policy: Any):
        super().__init__(**on_policy)
        self.threshold = check_number(threshold, "learning.threshold")

    def task_loss(self, module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ro = self.rollouts(module, batch)
        keep = torch.nan_to_num(ro.rewards, nan=-torch.inf) >= self.threshold
        if self.mask_truncated:
            keep = keep & ~ro.truncated
        self.count_rollouts(ro, keep)
        if module.should_log:
            self.measure(module, ro.batch)
        rows = keep.nonzero().flatten()
        trained = len(rows) > 0
        if not trained:  # nothing passed: a zero loss that still reaches every weight (DDP)
            rows = torch.zeros(1, dtype=torch.long, device=keep.device)
        logits, targets = labelled_logits(module.model, {k: v[rows] for k, v in ro.batch.items()})
        total = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        tokens = (targets != IGNORE_INDEX).sum() if trained else torch.zeros((), dtype=torch.long, device=keep.device)
        normalizer = (sum_across_ranks(tokens.to(torch.float64)) / world_size()).clamp(min=1.0)
        if not trained:
            return total * 0.0
        self.add(trained_tokens=float(tokens))
        return total / normalizer.to(total.dtype)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "threshold": self.threshold}
