"""Rollouts: G completions of every prompt of a micro-batch, sampled from the current policy.

Each prompt's group is generated on its own, from a seed derived from the run's seed, the stream
step and the example, so a group is the same whatever else shares its micro-batch, process or
batch layout (two processes sample what one does), and a resumed run samples what it would have:
the rollouts' random state is a function of the step, and the global generators are untouched
(training's dropout draws stay SFT's). Completions end at the first EOS (kept, as it is trained)
or at the token budget (truncated).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cl_bench.data.tokenization import IGNORE_INDEX, Collator
from cl_bench.training.lm import eval_mode


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
    #: [rows, T] the sampling policy's log-probabilities at its first use (for a reused batch's ratio)
    old_logps: torch.Tensor | None = None


def cut_at_eos(ids: Sequence[int], eos: int) -> tuple[list[int], bool]:
    """A generated row's completion: up to and including its first EOS (HF pads a row only after its
    EOS); without one, the whole row, truncated at the budget. Returns (ids, truncated)."""
    ids = list(ids)
    if eos in ids:
        return ids[: ids.index(eos) + 1], False
    return ids, True


@torch.no_grad()
def sample_group(
    model: torch.nn.Module,
    prompt: Sequence[int],
    group_size: int,
    max_new_tokens: int,
    sampling: dict,
    seed: int,
    eos: int,
    pad: int,
) -> tuple[list[list[int]], list[bool]]:
    """``group_size`` completions of one prompt (token ids), sampled with Hugging Face ``generate``
    under ``seed`` (the global generators are restored afterwards)."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt)] * group_size, dtype=torch.long, device=device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), eval_mode(model):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=True,
            pad_token_id=pad,
            eos_token_id=eos,
            use_cache=True,
            top_k=0,
            **sampling,
        )
    cut = [cut_at_eos(row.tolist(), eos) for row in out[:, ids.shape[1] :]]
    return [c for c, _ in cut], [t for _, t in cut]


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
