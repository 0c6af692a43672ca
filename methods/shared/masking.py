"""Importance masks shared by the masking methods (FGGM, random rows; MIGU uses the validators).

A Linear weight W has shape [D_out, D_in]; its rows are output units. Scores are aggregated per
row (sum over input columns), per column, or kept per element; a mask is one boolean per score,
broadcast back over the weight. 1-D tensors (biases, norms) always use element scores.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from cl_bench.errors import ConfigError, check_choice
from cl_bench.training.method import refuse_weight_decay

if TYPE_CHECKING:
    from cl_bench.training.parameter_views import ParameterViews

AGGREGATES = ("row", "column", "element")
REDUCTIONS = ("sum", "mean")
VECTORS = ("mask", "train", "freeze")
SCOPES = ("global", "per_layer")
DIRECTIONS = ("top", "bottom")


def select_parameters(
    model: torch.nn.Module, patterns: Iterable[str] | None, key: str
) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters whose names match any glob in ``patterns`` (all of them if None)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if patterns is None:
        return params
    patterns = list(patterns)
    chosen = {n: p for n, p in params.items() if any(fnmatch.fnmatch(n, pat) for pat in patterns)}
    if not chosen:
        raise ConfigError(f"{key} {patterns} match no trainable parameter (e.g. {next(iter(params), None)})")
    return chosen


def aggregate(score: torch.Tensor, how: str, reduce: str = "sum") -> torch.Tensor:
    """Per-row, per-column or per-element scores of one tensor (1-D tensors: per element).

    ``reduce="sum"`` adds a row's (column's) entries, which favours the rows of wide matrices (a
    Llama down_proj row has intermediate/hidden = 2.7x the entries of a q_proj row); ``"mean"``
    compares units of any width on the same footing.
    """
    if score.dim() != 2 or how == "element":
        return score
    dim = 1 if how == "row" else 0
    return score.sum(dim=dim) if reduce == "sum" else score.mean(dim=dim)


def expand(mask: torch.Tensor, shape: torch.Size, how: str) -> torch.Tensor:
    """Broadcast an aggregated mask back to the tensor's shape."""
    if len(shape) != 2 or how == "element":
        return mask
    return mask[:, None] if how == "row" else mask[None, :]


def kth_threshold(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """The value below or at which ``floor(fraction * n)`` of the n values lie (exact, any size)."""
    flat = values.flatten().float()
    k = math.floor(fraction * flat.numel())
    if k == 0:
        return flat.min() - 1
    return flat.kthvalue(k).values


def threshold_masks(
    scores: dict[str, torch.Tensor], alpha: float, scope: str = "global", update: str = "top"
) -> dict[str, torch.Tensor]:
    """Boolean masks of the entries to UPDATE: a fraction 1 - alpha of them, by score.

    ``update="top"`` keeps the highest scores trainable (score > the alpha-quantile);
    ``"bottom"`` keeps the lowest (score <= the (1 - alpha)-quantile). ``scope`` picks one
    threshold over all tensors or one per tensor.
    """
    check_choice(scope, SCOPES, "quantile_scope")
    check_choice(update, DIRECTIONS, "update")
    q = alpha if update == "top" else 1 - alpha

    def mask(s: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
        return s > thr if update == "top" else s <= thr

    if scope == "global":
        thr = kth_threshold(torch.cat([s.flatten().float() for s in scores.values()]), q)
        return {n: mask(s, thr) for n, s in scores.items()}
    return {n: mask(s, kth_threshold(s, q)) for n, s in scores.items()}


class GradientMask:
    """Multiplies each parameter's gradient by a fixed 0/1 mask, in place, at every optimizer step
    (:meth:`apply` from a method's ``edit_gradients``: after accumulation and the reduction over
    processes, on the rows this process holds under FSDP). Masking the step's gradient once equals
    masking every micro-batch's (0 and 1 are exact), so a masked entry gets a zero gradient; with a
    fresh Adam(W) per task and no weight decay on it, it stays bitwise unchanged.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], masks: dict[str, torch.Tensor]):
        """``masks[name]`` is boolean (or a share in [0, 1]) and broadcastable to ``params[name]``
        (e.g. [D_out, 1] for rows), whole."""
        self.shapes = {n: params[n].shape for n in masks}
        self.masks = {n: m.to(device=params[n].device, dtype=params[n].dtype) for n, m in masks.items()}

    def apply(self, views: ParameterViews) -> None:
        """Mask the step's gradients, in place."""
        for name, p in views.parameters(self.masks).items():
            grad = views.grad(p)
            if grad is not None:
                grad.mul_(views.rows(p, self.masks[name]).to(grad.dtype))

    def clear_optimizer_state(self, optimizers, model: torch.nn.Module) -> None:
        """Zero the masked entries of every per-parameter optimizer buffer (Adam's moments, SGD's
        momentum), so that an optimizer carried over from an earlier task leaves them unchanged."""
        names = {id(p): n for n, p in model.named_parameters()}
        for opt in optimizers:
            for p, state in opt.state.items():
                name = names.get(id(p))
                if name is None:
                    continue
                for buffer in state.values():
                    if name in self.masks and torch.is_tensor(buffer) and buffer.shape == p.shape:
                        buffer.mul_(self.masks[name].to(buffer.dtype))

    def updated_fraction(self, names: Iterable[str] | None = None) -> float:
        """Fraction of the (selected) parameters' entries whose gradient passes."""
        names = list(self.masks) if names is None else list(names)
        total = sum(self.shapes[n].numel() for n in names)
        kept = sum(self.masks[n].expand(self.shapes[n]).sum().item() for n in names)
        return kept / total if total else 0.0


def frozen_entries_need_zero_decay(trainer, method_name: str) -> None:
    """Decoupled weight decay moves entries whose gradient is masked to zero: refuse it."""
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            refuse_weight_decay(method_name, group.get("weight_decay", 0))
