"""Diagonal Fisher information of the answer log-likelihood, shared by EWC and FGGM.

    F_i = (1/N) sum_n ( d log p(y_n | x_n; theta) / d theta_i )^2                 (fisher="per_sample")
    F_i = (1/B) sum_b ( d [(1/|b|) sum_{n in b} log p(y_n | x_n; theta)] / d theta_i )^2   ("batch")

log p(y|x) is summed over the answer tokens and EOS (the empirical Fisher: ground-truth answers).
"per_sample" is the true empirical Fisher (one backward pass per example, sharing each batch's
forward pass); "batch" squares mini-batch gradients, as most LLM code does (one backward pass
per batch, cheaper, biased towards gradient directions shared within a batch).

The pass runs with dropout off (eval mode), takes no optimizer step, leaves ``.grad`` exactly as
it found it (gradients are taken with ``torch.autograd.grad``), and stops after ``num_samples``
examples. Every process runs every example (a pass batches by the config alone). Under DDP the
result is averaged over ranks, so every rank holds the same Fisher and builds the same mask. Under
FSDP the pass runs through the sharded model, one layer gathered at a time as in training: each
backward's gradient is reduce-scattered, and since every process ran the same example FSDP's mean
over processes is that example's gradient, of which each process reads its own rows. The estimate
is then this process's rows, and no process ever holds the whole model or a whole gradient.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch

from cl_bench.data.tokenization import IGNORE_INDEX
from cl_bench.errors import ConfigError, check_choice, check_number
from cl_bench.training.lm import answer_log_likelihood, eval_mode, labelled_logits
from cl_bench.training.parameter_views import ParameterViews

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


#: ``gradients(output, retain_graph)``: d output / d each tensor of the pass (None where unused)
Gradients = Callable[[torch.Tensor, bool], list]


def _gradients(tensors: list[torch.Tensor], sharded: bool) -> Gradients:
    """How the pass differentiates: ``torch.autograd.grad``, which leaves ``.grad`` alone; for
    FSDP's sharded parameters, which the forward uses through gathered copies, a backward whose
    reduce-scattered gradient shards are read and cleared (the caller saves and restores ``.grad``)."""
    if not sharded:
        return lambda output, retain: list(torch.autograd.grad(output, tensors, retain_graph=retain, allow_unused=True))

    def shards(output: torch.Tensor, retain: bool) -> list:
        output.backward(retain_graph=retain)
        grads = [ParameterViews.grad(p) for p in tensors]
        for p in tensors:
            p.grad = None
        return grads

    return shards


def _importance_pass(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    params: dict[str, torch.nn.Parameter],
    num_samples: int | None,
    add_batch: Callable[[dict[str, torch.Tensor], Gradients, list[torch.Tensor]], tuple[int, int]],
    what: str,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The pass every importance estimate shares: eval mode, at most ``num_samples`` examples,
    ``add_batch(batch, gradients, acc) -> (examples, terms)`` accumulates into fp32 buffers (this
    process's rows under FSDP), which are divided by the number of terms and averaged over ranks
    (not under FSDP, where each process holds other rows)."""
    start = time.perf_counter()
    names, tensors = list(params), list(params.values())
    views = ParameterViews(model)
    sharded = views.sharded  # FSDP: this process's rows of each parameter
    acc = [torch.zeros_like(views.weight(p), dtype=torch.float32) for p in tensors]
    device = acc[0].device
    saved = [p.grad for p in tensors] if sharded else []  # FSDP's backward writes .grad: put back after
    if sharded:
        for p in tensors:
            p.grad = None
    gradients = _gradients(tensors, sharded)
    seen, terms = 0, 0
    try:
        with eval_mode(model):
            for batch in batches:
                if num_samples is not None and seen >= num_samples:
                    break
                batch = {
                    k: v[: None if num_samples is None else num_samples - seen].to(device) for k, v in batch.items()
                }
                examples, added = add_batch(batch, gradients, acc)
                seen, terms = seen + examples, terms + added
    finally:
        for p, g in zip(tensors, saved):
            p.grad = g
    if terms == 0:
        raise ConfigError(f"the {what} pass got no examples (empty training split?)")
    for a in acc:
        a.div_(terms)
    views.average_replicas(acc)  # DDP: every process's own examples; FSDP: each process's rows
    return dict(zip(names, acc)), {"samples": seen, "seconds": time.perf_counter() - start}


def diagonal_fisher(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    params: dict[str, torch.nn.Parameter],
    mode: str = "per_sample",
    num_samples: int | None = 512,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The diagonal Fisher of ``params`` (fp32, same shapes) and stats: samples, seconds.

    ``num_samples=None`` reads every batch.
    """
    check_fisher_args(mode, num_samples, "method")

    def add_batch(batch, gradients, fisher):
        ll = answer_log_likelihood(model, batch)
        if mode == "batch":
            _add_squares(fisher, gradients(ll.mean(), False))
            return ll.shape[0], 1
        for i in range(ll.shape[0]):
            _add_squares(fisher, gradients(ll[i], i < ll.shape[0] - 1))
        return ll.shape[0], ll.shape[0]

    return _importance_pass(model, batches, params, num_samples, add_batch, "Fisher")


def output_sensitivity(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    params: dict[str, torch.nn.Parameter],
    num_samples: int | None = 512,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """MAS importance (Aljundi et al. 2018): the mean over examples of | d ||f(x)||^2 / d theta |,
    f(x) the logits at the positions that predict the answer (no labels are used)."""

    def add_batch(batch, gradients, acc):
        logits, targets = labelled_logits(model, batch)
        squared = (logits.square() * (targets != IGNORE_INDEX).unsqueeze(-1)).sum(dim=(1, 2))
        for i in range(squared.shape[0]):
            for a, g in zip(acc, gradients(squared[i], i < squared.shape[0] - 1)):
                if g is not None:
                    a.add_(g.detach().float().abs())
        return squared.shape[0], squared.shape[0]

    return _importance_pass(model, batches, params, num_samples, add_batch, "MAS importance")


def overall_mean(tensors: dict[str, torch.Tensor], views: ParameterViews) -> float:
    """The mean of every entry of every tensor (telemetry), per-entry state as ``views`` hold it
    (under FSDP each process's rows: the sums and counts are added over processes)."""
    total = torch.tensor(
        [sum(t.sum().item() for t in tensors.values()), sum(t.numel() for t in tensors.values())], dtype=torch.float64
    )
    total = views.sum_over_shards(total)
    return (total[0] / total[1]).item()


def _add_squares(acc: list[torch.Tensor], grads) -> None:
    for a, g in zip(acc, grads):
        if g is not None:
            g = g.detach().float()
            a.addcmul_(g, g)  # in place: no squared copy of every gradient
