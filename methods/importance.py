"""Diagonal Fisher information of the answer log-likelihood, shared by EWC and FGGM.

    F_i = (1/N) sum_n ( d log p(y_n | x_n; theta) / d theta_i )^2                 (fisher="per_sample")
    F_i = (1/B) sum_b ( d [(1/|b|) sum_{n in b} log p(y_n | x_n; theta)] / d theta_i )^2   ("batch")

log p(y|x) is summed over the answer tokens and EOS (the empirical Fisher: ground-truth answers).
"per_sample" is the true empirical Fisher (one backward pass per example, sharing each batch's
forward pass); "batch" squares mini-batch gradients, as most LLM code does (one backward pass
per batch, cheaper, biased towards gradient directions shared within a batch).

The pass runs with dropout off (eval mode), takes no optimizer step, leaves ``.grad`` exactly as
it found it (gradients are taken with ``torch.autograd.grad``), and stops after ``num_samples``
examples. Under torch.distributed the result is averaged over ranks, so every rank holds the same
Fisher and builds the same mask.
"""
from __future__ import annotations

import random
import time
from typing import Callable, Iterable, Sequence, TypeVar

import torch

from cl_bench.distributed import average_across_ranks
from cl_bench.errors import ConfigError, check_choice, check_number
from cl_bench.data.tokenization import IGNORE_INDEX
from cl_bench.training.lm import answer_log_likelihood, labelled_logits

FISHER_MODES = ("per_sample", "batch")
T = TypeVar("T")


def check_fisher_args(mode: str, num_samples: int, key: str) -> None:
    """The Fisher settings of method config ``key``: its ``fisher`` mode and ``num_samples``."""
    check_choice(mode, FISHER_MODES, f"{key}.fisher")
    check_number(num_samples, f"{key}.num_samples", integer=True, low=1, allow_none=True)


def sample_examples(examples: Sequence[T], num_samples: int | None, seed: int) -> list[T]:
    """A seeded uniform sample of ``num_samples`` of ``examples`` (in their order); all if None or more."""
    if num_samples is None or num_samples >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), num_samples))
    return [examples[i] for i in keep]


def _importance_pass(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    params: dict[str, torch.nn.Parameter],
    num_samples: int | None,
    average_ranks: bool,
    add_batch: Callable[[dict[str, torch.Tensor], list[torch.Tensor], list[torch.Tensor]], tuple[int, int]],
    what: str,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The pass every importance estimate shares: eval mode, at most ``num_samples`` examples,
    ``add_batch(batch, tensors, acc) -> (examples, terms)`` accumulates into fp32 buffers, which are
    divided by the number of terms and averaged over ranks."""
    start = time.perf_counter()
    names, tensors = list(params), list(params.values())
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    device = tensors[0].device
    was_training = model.training
    model.eval()
    seen, terms = 0, 0
    try:
        for batch in batches:
            if num_samples is not None and seen >= num_samples:
                break
            batch = {k: v[: None if num_samples is None else num_samples - seen].to(device) for k, v in batch.items()}
            examples, added = add_batch(batch, tensors, acc)
            seen, terms = seen + examples, terms + added
    finally:
        model.train(was_training)
    if terms == 0:
        raise ConfigError(f"the {what} pass got no examples (empty training split?)")
    for a in acc:
        a.div_(terms)
    if average_ranks:
        average_across_ranks(acc)
    return dict(zip(names, acc)), {"samples": seen, "seconds": time.perf_counter() - start}


def diagonal_fisher(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    params: dict[str, torch.nn.Parameter],
    mode: str = "per_sample",
    num_samples: int | None = 512,
    average_ranks: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The diagonal Fisher of ``params`` (fp32, same shapes) and stats: samples, seconds.

    ``num_samples=None`` reads every batch. ``average_ranks=False`` skips the mean over processes,
    for callers whose processes estimate different parameters on the same data (EWC's sharded state).
    """
    check_fisher_args(mode, num_samples, "method")

    def add_batch(batch, tensors, fisher):
        ll = answer_log_likelihood(model, batch)
        if mode == "batch":
            _add_squares(fisher, torch.autograd.grad(ll.mean(), tensors, allow_unused=True))
            return ll.shape[0], 1
        for i in range(ll.shape[0]):
            grads = torch.autograd.grad(ll[i], tensors, retain_graph=i < ll.shape[0] - 1, allow_unused=True)
            _add_squares(fisher, grads)
        return ll.shape[0], ll.shape[0]
    return _importance_pass(model, batches, params, num_samples, average_ranks, add_batch, "Fisher")


def output_sensitivity(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    params: dict[str, torch.nn.Parameter],
    num_samples: int | None = 512,
    average_ranks: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """MAS importance (Aljundi et al. 2018): the mean over examples of | d ||f(x)||^2 / d theta |,
    f(x) the logits at the positions that predict the answer (no labels are used)."""

    def add_batch(batch, tensors, acc):
        logits, targets = labelled_logits(model, batch)
        squared = (logits.square() * (targets != IGNORE_INDEX).unsqueeze(-1)).sum(dim=(1, 2))
        for i in range(squared.shape[0]):
            grads = torch.autograd.grad(squared[i], tensors, retain_graph=i < squared.shape[0] - 1, allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a.add_(g.detach().float().abs())
        return squared.shape[0], squared.shape[0]
    return _importance_pass(model, batches, params, num_samples, average_ranks, add_batch, "MAS importance")


def overall_mean(tensors: dict[str, torch.Tensor]) -> float:
    """The mean of every entry of every tensor (telemetry)."""
    return sum(t.sum().item() for t in tensors.values()) / sum(t.numel() for t in tensors.values())


def _add_squares(acc: list[torch.Tensor], grads) -> None:
    for a, g in zip(acc, grads):
        if g is not None:
            g = g.detach().float()
            a.addcmul_(g, g)  # in place: no squared copy of every gradient
