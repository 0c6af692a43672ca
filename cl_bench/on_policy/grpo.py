"""GRPO (Shao et al. 2024, DeepSeekMath) with TRL's loss aggregations (grpo, bnpo, dapo, dr_grpo).

For every prompt x of a micro-batch::

    sample y_1..y_G ~ pi_old(. | x)                      (temperature, top-p; HF generate)
    r_i = reward(x, y_i)                                 (the task's scorer on 0-1, or learning.reward)
    A_i = (r_i - mean r) / (std r + 1e-4)                (scale_rewards; "none" for Dr. GRPO)
    drop the groups whose rewards are all equal           (skip_zero_std: no signal; counted)
    L = agg_t [ -min(rho_t A_i, clip(rho_t, 1-eps_lo, 1+eps_hi) A_i) + beta k3_t ]

rho_t = pi(y_t) / pi_old(y_t) is 1 at a rollout's first use; with ``num_iterations`` mu > 1 every
global batch is trained for mu optimizer steps on the same rollouts, and the ratio then clips
(cl_bench/on_policy/policy_loss.py has the formulas). The reference of the KL term is the
base model (a frozen copy of the untrained weights, or the model with its LoRA adapters off).
"""

from __future__ import annotations

from typing import Any

import torch

from cl_bench.data.batching import layout
from cl_bench.data.tokenization import IGNORE_INDEX
from cl_bench.errors import ConfigError, check_choice, check_flag, check_number
from cl_bench.on_policy.base import OnPolicy
from cl_bench.on_policy.policy_loss import (
    LOSS_TYPES,
    SCALE_REWARDS,
    PolicyLossSettings,
    group_advantages,
    policy_loss,
    zero_std_groups,
)
from cl_bench.on_policy.rollouts import Rollouts, rows_of
from cl_bench.training.lm import labelled_logits, shared_prompt_logits


def token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(target) at each position from logits divided by the sampling temperature (as TRL)."""
    logp = torch.log_softmax(logits / temperature, -1)
    return logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)


class GRPO(OnPolicy):
    name = "grpo"

    def __init__(
        self,
        loss_type: str = "dapo",
        beta: float = 0.0,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        num_iterations: int = 1,
        scale_rewards: str | None = None,
        skip_zero_std: bool = True,
        shared_prompt_pass: bool = True,
        **on_policy: Any,
    ):
        super().__init__(**on_policy)
        #: each prompt's forward pass once for its G completions (its KV cache shared), not G times
        self.shared_prompt_pass = check_flag(shared_prompt_pass, "learning.shared_prompt_pass")
        self.loss_type = check_choice(loss_type, LOSS_TYPES, "learning.loss_type")
        self.beta = check_number(beta, "learning.beta", low=0)
        check_number(epsilon, "learning.epsilon", low=0)
        high = epsilon if epsilon_high is None else check_number(epsilon_high, "learning.epsilon_high", low=0)
        self.loss = PolicyLossSettings(self.loss_type, float(epsilon), float(high), float(beta))
        self.iterations = check_number(num_iterations, "learning.num_iterations", integer=True, low=1)
        # Dr. GRPO divides by no standard deviation: its loss type implies scale_rewards "none"
        default = "none" if loss_type == "dr_grpo" else "group"
        self.scale_rewards = check_choice(scale_rewards or default, SCALE_REWARDS, "learning.scale_rewards")
        self.skip_zero_std = check_flag(skip_zero_std, "learning.skip_zero_std")
        #: the current global batch's rollouts, by micro-batch, while num_iterations reuses them
        self.cache: dict[int, Rollouts] = {}

    @property
    def needs_reference(self) -> bool:
        return self.kl_telemetry or self.beta != 0

    def begin_task(self, examples, task_name: str) -> None:
        super().begin_task(examples, task_name)
        self.cache = {}

    def step_rollouts(self, module, batch: dict[str, torch.Tensor]) -> Rollouts:
        """This micro-batch's rollouts: sampled at the first of the num_iterations steps of its global
        batch, reused at the others."""
        key = module.micro_batch_in_step
        if module.global_step % self.iterations == 0 or key not in self.cache:
            self.cache[key] = self.rollouts(module, batch)
        ro = self.cache[key]
        if ro.index != batch["index"].tolist():
            raise RuntimeError(f"rollouts of examples {ro.index} reused for a batch of {batch['index'].tolist()}")
        return ro

    def unlearned(self, sums: dict[str, float]) -> str | None:
        if why := super().unlearned(sums):
            return why
        if sums["groups"] and sums["skipped_groups"] == sums["groups"]:
            return "every prompt's completions got equal rewards (zero advantages: no policy gradient)"
        return None

    def task_loss(self, module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ro = self.step_rollouts(module, batch)
        g = self.num_generations
        advantages = group_advantages(ro.rewards, g, self.scale_rewards)
        keep = torch.ones_like(ro.truncated)
        if self.skip_zero_std:
            keep = ~zero_std_groups(ro.rewards, g).repeat_interleave(g)
        self.count_rollouts(ro, keep)
        rows = keep.nonzero().flatten()
        trained = len(rows) > 0
        if not trained:  # every group skipped: a zero loss that still reaches every weight (DDP)
            rows = torch.zeros(1, dtype=torch.long, device=keep.device)
        sub = rows_of(ro.batch, rows)
        logits, targets = self.completion_logits(module.model, ro, rows, sub)
        logps = token_logps(logits, targets, self.temperature)
        mask = (targets != IGNORE_INDEX) & trained  # the stand-in row counts no token (dapo's N)
        if self.mask_truncated:
            mask = mask & ~ro.truncated[rows].unsqueeze(1)
        if ro.old_logps is None or ro.old_logps.shape != logps.shape:
            ro.old_logps = logps.detach()  # the sampling policy: this very forward at a rollout's first use
        ref = None
        if self.beta != 0:  # the base model's log-probabilities of the same tokens, in this layout
            base = self.reference_logits(module.model, sub)
            base_targets = sub["labels"][:, -base.shape[1] :]
            ref = torch.zeros_like(logps)
            ref[targets != IGNORE_INDEX] = token_logps(base, base_targets, self.temperature)[
                base_targets != IGNORE_INDEX
            ]
        tokens = module.processes.sum(mask.sum().to(torch.float64))
        loss, parts = policy_loss(
            logps,
            ro.old_logps,
            advantages[rows],
            mask,
            self.loss,
            ref_logps=ref,
            normalizer=(tokens / module.processes.world_size).clamp(min=1.0).to(logps.dtype),
            budgets=ro.budgets[rows],
        )
        if module.should_log:
            self.measure(module, ro.batch)
        if not trained:
            return loss * 0.0
        self.add(trained_tokens=float(mask.sum()), clipped_tokens=float((parts["clipped"] & mask).sum()))
        return loss

    def completion_logits(
        self, model, ro: Rollouts, rows: torch.Tensor, sub: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's logits at the ``rows``' completion tokens: each prompt's pass once for its
        group (``shared_prompt_pass``), or every row's prompt and completion in one pass."""
        if not self.shared_prompt_pass:
            return labelled_logits(model, sub)
        groups, group = torch.unique(rows // self.num_generations, return_inverse=True)
        prompts = [ro.prompts[int(k)] for k in groups]
        completions = [ro.completions[int(r)] for r in rows]
        return shared_prompt_logits(model, prompts, completions, group, self.tokenizer.pad_token_id)

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "loss_type": self.loss_type,
            "beta": self.beta,
            "epsilon": [self.loss.epsilon_low, self.loss.epsilon_high],
            "num_iterations": self.iterations,
            "scale_rewards": self.scale_rewards,
            "skip_zero_std": self.skip_zero_std,
        }

    def check_run(self, cfg: Any, method: Any) -> None:
        super().check_run(cfg, method)
        if self.iterations > 1:
            world = int(cfg.trainer.get("devices", 1) or 1) * int(cfg.trainer.get("num_nodes", 1) or 1)
            _, _, accumulate = layout(cfg.train.batch_size, cfg.train.get("micro_batch_size"), world)
            if accumulate > 1 and not cfg.train.get("drop_last", False):
                raise ConfigError(
                    f"learning.num_iterations={self.iterations} with gradient accumulation (train.micro_batch_size) "
                    "needs train.drop_last=true: an epoch's last, smaller batch would cut fewer micro-batches "
                    "than a step takes, and its reused rollouts would fall into one step"
                )

    @property
    def checkpoint_every(self) -> int:
        """Step checkpoints fall where no rollouts await reuse (a multiple of num_iterations)."""
        return self.iterations
