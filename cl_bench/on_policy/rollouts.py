"""Rollouts: G completions of every prompt of a micro-batch, sampled from the current policy.

The run's engine (cl_bench/generation/engine.py) samples the micro-batch's groups in one call, each
completion drawn by its own generator, seeded from the run's seed, the stream step, the example and
its place in the group: a completion's draws do not depend on what shares its micro-batch, process
or batch layout, and a resumed run samples what it would have; the global generators are untouched
(training's dropout draws stay SFT's). Completions end at the first EOS (kept, as it is trained)
or at the token budget (truncated).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cl_bench.data.tokenization import IGNORE_INDEX, Collator


@dataclass
class Rollouts:
    """G completions of each prompt of a micro-batch, rows grouped by prompt, and their rewards."""

    #: left-padded prompt + completion rows (``input_ids``, ``attention_mask``, ``labels`` on the completion)
    batch: dict[str, torch.Tensor]
    #: each row's completion token ids (EOS included when generated)
    completions: list[list[int]]
    #: [rows] rewards
    rewards: torch.Tensor
    #: [rows] True where the completion hit its token budget without EOS
    truncated: torch.Tensor
    #: [rows] each row's token budget (dr_grpo's constant)
    budgets: torch.Tensor
    #: the example index of each prompt (the micro-batch's ``index``)
    index: list[int] = field(default_factory=list)
    #: each group's prompt token ids (the shared-prompt pass runs each once)
    prompts: list[list[int]] = field(default_factory=list)
    #: [rows, T] the sampling policy's log-probabilities at its first use (for a reused batch's ratio)
    old_logps: torch.Tensor | None = None


def completion_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad: int) -> dict:
    """Left-padded rows of prompt + completion, labelled on the completion (as a training batch)."""
    rows = [
        {"input_ids": list(p) + list(c), "labels": [IGNORE_INDEX] * len(p) + list(c)}
        for p, c in zip(prompts, completions)
    ]
    return Collator(pad)(rows)


def rows_of(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``rows`` of every tensor of a rollouts batch (the completions a loss trains on)."""
    return {k: v[rows] for k, v in batch.items()}
