"""Learning-rate schedules a run's ``scheduler`` config builds (called with the optimizer at every
fit, or once when the optimizer runs the whole stream)."""

from __future__ import annotations

import torch


def constant_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int = 0):
    """TRACE's schedule: linear warm-up over ``warmup_steps`` optimizer steps, then constant."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup_steps + 1)))
