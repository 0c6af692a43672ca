"""GRPO's arithmetic on one micro-batch of rollouts, as TRL's ``GRPOTrainer`` defines it.

Rows are grouped: rows ``[g*G, (g+1)*G)`` are the G completions of prompt g. With r_i a
completion's reward, a group's mean mu_g and its standard deviation sigma_g (unbiased, as torch's
``std``)::

    A_i = (r_i - mu_g) / (sigma_g + 1e-4)       scale_rewards="group"   (TRL's default)
    A_i = (r_i - mu_g) / (sigma_B + 1e-4)       scale_rewards="batch"   (sigma over every reward of the batch)
    A_i =  r_i - mu_g                           scale_rewards="none"    (Dr. GRPO)

Per completion token t of row i, with pi the policy's probability of the token (logits divided
by the sampling temperature), pi_old the policy that sampled it and pi_ref the base model::

    rho   = pi / pi_old                          (exactly 1 at a rollout's first use)
    l_t   = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_t
    k3_t  = pi_ref / pi - log(pi_ref / pi) - 1   (Schulman's estimator of KL(pi || pi_ref))

and the loss aggregates l over the completion mask M (TRL's ``loss_type``)::

    grpo     mean_i ( sum_t M l / sum_t M )                 per sequence, then over sequences
    bnpo     sum M l / sum M                                  token mean over the micro-batch
    dapo     sum M l / N                                      N: the micro-batch's completion tokens
                                                              summed over the processes, / W
    dr_grpo  sum M l / (rows * max_completion_length)         a constant denominator (here each
                                                              row's token budget, summed)

A group whose G rewards are all equal (sigma_g = 0) has A = 0 and carries no signal; with
``skip_zero_std`` its rows leave the loss entirely (numerator and denominator: the RIF-RFT filter),
else they stay in the denominator, as in TRL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
#: TRL's constant in the advantage's denominator
STD_EPSILON = 1e-4


def nanstd(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The unbiased standard deviation along ``dim`` ignoring NaN (TRL's ``nanstd``; NaN below 2 values)."""
    n = (~x.isnan()).sum(dim, keepdim=True)
    centred = x - x.nanmean(dim, keepdim=True)
    var = torch.nansum(centred**2, dim, keepdim=True) / (n - 1)
    return var.sqrt().squeeze(dim)


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """Each reward minus its group's mean, divided by the group's (or the batch's) std + 1e-4 unless
    ``scale_rewards`` is "none"; ``rewards`` [groups * group_size], grouped consecutively. A NaN
    reward (a completion the reward function did not score) is left out of the statistics and gets
    advantage 0, as in TRL."""
    grouped = rewards.view(-1, group_size)
    advantages = (grouped - grouped.nanmean(1, keepdim=True)).flatten()
    if scale_rewards == "batch":
        advantages = advantages / (nanstd(rewards, 0) + STD_EPSILON)
    elif scale_rewards == "group":
        advantages = advantages / (nanstd(grouped, 1).repeat_interleave(group_size) + STD_EPSILON)
    return torch.nan_to_num(advantages, nan=0.0)


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[groups] True where a group's rewards are all equal (TRL's ``isclose(std, 0)``)."""
    std = nanstd(rewards.view(-1, group_size), 1)
    return torch.isclose(std, torch.zeros_like(std))


@dataclass(frozen=True)
class PolicyLossSettings:
    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0


def per_token_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(pi || pi_ref) at each sampled token: exp(d) - d - 1, d = ref - logp."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    settings: PolicyLossSettings,
    ref_logps: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    budgets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, per-token tensors for telemetry) of one micro-batch: ``logps``, ``old_logps``,
    ``ref_logps`` and ``mask`` [rows, T] (mask 1 on completion tokens), ``advantages`` [rows];
    ``normalizer``: dapo's N (see the module doc), ``budgets`` [rows]: each row's token budget (dr_grpo's
    max_completion_length; default T). The loss is the micro-batch's share before
    Lightning divides by the accumulation count and DDP averages over processes."""
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - settings.epsilon_low, 1 + settings.epsilon_high)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if ref_logps is not None and settings.beta != 0:
        kl = per_token_kl(logps, ref_logps)
        per_token = per_token + settings.beta * kl
    kind = settings.loss_type
    if kind == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif kind == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif kind == "dr_grpo":
        denominator = budgets.sum() if budgets is not None else per_token.shape[0] * per_token.shape[1]
        loss = (per_token * mask).sum() / denominator
    elif kind == "dapo":
        loss = (per_token * mask).sum() / (normalizer if normalizer is not None else mask.sum().clamp(min=1.0))
    else:
        raise ValueError(f"unknown loss_type {kind!r}; known: {list(LOSS_TYPES)}")
    low = (ratio < 1 - settings.epsilon_low) & (adv < 0)
    high = (ratio > 1 + settings.epsilon_high) & (adv > 0)
    return loss, {"clipped": (low | high).detach(), "low": low.detach(), "high": high.detach(), "kl": kl}
