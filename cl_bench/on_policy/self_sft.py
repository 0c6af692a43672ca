"""Self-SFT: supervised fine-tuning on the policy's own filtered samples (the middle baseline of
Chen et al. 2025, "Retaining by Doing", princeton-pli/retaining-by-doing).

For every prompt x of a micro-batch::

    sample y_1..y_G ~ pi(. | x)                 (as GRPO's rollouts)
    keep  {y_i : reward(x, y_i) >= threshold}   (the authors keep the correct ones)
    L = token mean over the kept completions of -log pi(y_t | x, y_<t)      (the SFT loss)

By default (``threshold: null``) a completion is kept when it is right as per-example forgetting
counts an answer right: reward 1 under an exact metric (the authors' "correct"), at least
``eval.right_threshold`` / 100 under ROUGE-L, edit similarity or SARI, where a reward of 1 is
rarely reached. A number keeps every completion whose reward reaches it, whatever its task.

The token mean runs over the kept tokens of every process's micro-batch (the count is summed over
the processes, as the SFT loss's normaliser is), so two processes train as one does.
"""

from __future__ import annotations

from typing import Any

import torch

from cl_bench.data.tokenization import IGNORE_INDEX
from cl_bench.errors import ConfigError, check_number
from cl_bench.evaluation.example_forgetting import BINARY_METRICS
from cl_bench.on_policy.base import OnPolicy
from cl_bench.on_policy.rewards import TaskScore
from cl_bench.on_policy.rollouts import rows_of
from cl_bench.training.lm import labelled_logits


class SelfSFT(OnPolicy):
    name = "self_sft"

    def __init__(self, threshold: float | None = None, right_threshold: float = 50.0, **on_policy: Any):
        super().__init__(**on_policy)
        self.threshold = check_number(threshold, "learning.threshold", allow_none=True)
        self.right_threshold = check_number(right_threshold, "learning.right_threshold", low=0, high=100)

    def check_run(self, cfg: Any, method: Any) -> None:
        super().check_run(cfg, method)
        if self.threshold is not None and self.threshold > 1 and isinstance(self.reward, TaskScore):
            raise ConfigError(
                f"learning.threshold={self.threshold}: the task scorers' rewards lie in [0, 1], so no completion "
                "would ever be trained on; set a reward in [0, 1] (or null: a completion is kept when it is right)"
            )

    def unlearned(self, sums: dict[str, float]) -> str | None:
        if why := super().unlearned(sums):
            return why
        if sums["completions"] and not sums["trained_rows"]:
            bar = (
                "learning.threshold"
                if self.threshold is not None
                else "the right-answer bar (learning.threshold: null)"
            )
            return f"no completion reached {bar}"
        return None

    def bar(self, metric: str) -> float:
        """The reward a completion of a task scored by ``metric`` must reach to be trained on."""
        if self.threshold is not None:
            return float(self.threshold)
        return 1.0 if metric in BINARY_METRICS else self.right_threshold / 100.0

    def task_loss(self, module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ro = self.rollouts(module, batch)
        bars = torch.tensor(
            [self.bar(self.task_of[self.examples[i]].metric) for i in ro.index], device=ro.rewards.device
        )
        keep = torch.nan_to_num(ro.rewards, nan=-torch.inf) >= bars.repeat_interleave(self.num_generations)
        if self.mask_truncated:
            keep = keep & ~ro.truncated
        self.count_rollouts(ro, keep)
        if module.should_log:
            self.measure(module, ro.batch)
        rows = keep.nonzero().flatten()
        trained = len(rows) > 0
        if not trained:  # nothing passed: a zero loss that still reaches every weight (DDP)
            rows = torch.zeros(1, dtype=torch.long, device=keep.device)
        logits, targets = labelled_logits(module.model, rows_of(ro.batch, rows))
        total = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        tokens = (targets != IGNORE_INDEX).sum() if trained else torch.zeros((), dtype=torch.long, device=keep.device)
        normalizer = (module.processes.sum(tokens.to(torch.float64)) / module.processes.world_size).clamp(min=1.0)
        if not trained:
            return total * 0.0
        self.add(trained_tokens=float(tokens))
        return total / normalizer.to(total.dtype)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "threshold": self.threshold, "right_threshold": self.right_threshold}
