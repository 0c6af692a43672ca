"""Methods that freeze part of the model for a whole task with one gradient mask.

Subclasses say how the entries are scored at the start of a task (:meth:`scores`); this base
aggregates the scores (row / column / element), thresholds them so that a fraction 1 - alpha is
updated, and masks the gradient of every optimizer step of the task (the rows this process holds
under FSDP). Under FSDP a score that needs gradients is taken
through the sharded model, so each process holds the scores of its own rows; the per-unit scores
of every process are then put together (:func:`unit_scores_of_shards`) and every process builds
the same whole mask.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence

import torch

from cl_bench.errors import ConfigError, check_choice, check_fraction
from cl_bench.training.method import CLMethod, trainable_bytes
from cl_bench.training.parameter_views import ParameterViews
from methods.shared.masking import (
    AGGREGATES,
    DIRECTIONS,
    REDUCTIONS,
    SCOPES,
    VECTORS,
    GradientMask,
    aggregate,
    expand,
    frozen_entries_need_zero_decay,
    select_parameters,
    threshold_masks,
)


def unit_scores_of_shards(
    views: ParameterViews, scores: dict[str, torch.Tensor], params: dict[str, torch.Tensor], how: str, reduce: str
) -> dict[str, torch.Tensor]:
    """FSDP: from each process's rows of per-entry scores, the per-unit scores of the whole tensors
    on every process, shaped so that :func:`aggregate` gives them back unchanged: [rows, 1] for row
    scores (gathered), [1, columns] for column scores (summed over the processes' rows), the whole
    tensor for entries and 1-D tensors (gathered). Every process must call it."""
    out, rows = {}, {}
    for n, s in scores.items():
        if s.dim() == 2 and how == "row":
            rows[n] = aggregate(s, "row", reduce)[:, None]
        elif s.dim() == 2 and how == "column":
            column = views.sum_over_shards(s.sum(dim=0))
            out[n] = (column / params[n].shape[0] if reduce == "mean" else column)[None, :]
        else:
            rows[n] = s
    out.update(views.whole_rows(rows, params))
    return {n: out[n] for n in scores}


def layer_group(name: str) -> str:
    """A coarse group for telemetry: attention, mlp, embeddings, norms, lm_head."""
    for key, group in (
        ("attn", "attention"),
        ("mlp", "mlp"),
        ("embed", "embeddings"),
        ("norm", "norms"),
        ("lm_head", "lm_head"),
    ):
        if key in name:
            return group
    return "other"


class FixedMaskMethod(CLMethod):
    name = "fixed_mask"
    trains_lora = True  # scores and masks over the trainable weights: the adapters' rows under LoRA
    masks_gradients = True
    supported_strategies = ("single_device", "ddp", "fsdp")
    #: :meth:`scores` gives whole tensors even under FSDP (scores drawn from the shapes alone)
    scores_whole_tensors = False

    def __init__(
        self,
        alpha: float = 0.7,
        aggregate: str = "row",
        quantile_scope: str = "global",
        update: str = "top",
        skip_first_task: bool = True,
        param_patterns: Sequence[str] | None = None,
        aggregate_reduce: str = "sum",
        vectors: str = "mask",
    ):
        """``vectors``: what happens to 1-D tensors (norm weights, biases): ``mask`` ranks their
        entries with the rest (under a global quantile they are then almost always frozen),
        ``train`` always updates them, ``freeze`` never does."""
        check_fraction(alpha, "method.alpha")
        self.aggregate_reduce = check_choice(aggregate_reduce, REDUCTIONS, "method.aggregate_reduce")
        self.vectors = check_choice(vectors, VECTORS, "method.vectors")
        check_choice(aggregate, AGGREGATES, "method.aggregate")
        check_choice(quantile_scope, SCOPES, "method.quantile_scope")
        check_choice(update, DIRECTIONS, "method.update")
        self.alpha, self.aggregate, self.quantile_scope, self.update = alpha, aggregate, quantile_scope, update
        self.skip_first_task = skip_first_task
        self.param_patterns = None if param_patterns is None else list(param_patterns)
        self.mask: GradientMask | None = None
        self.task_index = 0
        #: aggregated scores behind the current mask (one per row / column / entry): telemetry, tests
        self.last_scores: dict[str, torch.Tensor] = {}
        #: fraction of those units (rows, columns or entries) that are updated: 1 - alpha up to ties
        self.last_unit_fraction = 0.0

    def scores(self, module, task, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
        """Per-entry importance of ``params`` for ``task`` (same shapes as the parameters)."""
        raise NotImplementedError

    def build_masks(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Boolean masks of the entries to update, broadcastable to each parameter."""
        agg = {n: aggregate(s, self.aggregate, self.aggregate_reduce) for n, s in scores.items()}
        self.last_scores = agg
        ranked = agg if self.vectors == "mask" else {n: a for n, a in agg.items() if scores[n].dim() == 2}
        keep = threshold_masks(ranked, self.alpha, self.quantile_scope, self.update)
        keep.update(
            {
                n: torch.full(a.shape, self.vectors == "train", dtype=torch.bool, device=a.device)
                for n, a in agg.items()
                if n not in keep
            }
        )
        self.last_unit_fraction = sum(int(k.sum()) for k in keep.values()) / sum(k.numel() for k in keep.values())
        return {n: expand(keep[n], scores[n].shape, self.aggregate) for n in scores}

    def planned_state(self, model, world, tasks):
        """The masks: one bool per row, column or entry (``aggregate``) of each trainable weight."""
        unit = {"row": lambda p: p.shape[0], "column": lambda p: p.shape[1]}.get(self.aggregate)
        return {
            "masks (bool)": sum(
                unit(p) if unit and p.dim() == 2 else p.numel() for p in model.parameters() if p.requires_grad
            )
        }

    def planned_pass(self, model, world):
        """The scores of every trainable entry (fp32) at each task start: under FSDP of this
        process's rows, unless they are whole tensors."""
        share = world if self.row_shards and not self.scores_whole_tensors else 1
        return {"scoring pass: scores (fp32)": trainable_bytes(model, 4) // share}

    def on_stream_start(self, module, stream) -> None:
        select_parameters(module.model, self.param_patterns, "method.param_patterns")

    def on_task_start(self, module, task, task_index: int) -> None:
        self.task_index = task_index
        if task_index == 0 and self.skip_first_task:
            return
        start = time.perf_counter()
        params = select_parameters(module.model, self.param_patterns, "method.param_patterns")
        scores = self.scores(module, task, params)
        views = ParameterViews(module.model)
        if views.sharded and not self.scores_whole_tensors:  # FSDP: this process's rows
            scores = unit_scores_of_shards(views, scores, params, self.aggregate, self.aggregate_reduce)
        masks = self.build_masks(scores)
        self.mask = GradientMask(params, masks)
        groups = defaultdict(list)
        for n in masks:
            groups[layer_group(n)].append(n)
        metrics = {
            f"{self.name}/updated_fraction": self.mask.updated_fraction(),
            f"{self.name}/updated_unit_fraction": self.last_unit_fraction,
            f"{self.name}/mask_s": time.perf_counter() - start,
        }
        metrics.update(
            {f"{self.name}/updated_fraction/{g}": self.mask.updated_fraction(ns) for g, ns in groups.items()}
        )
        module.log_metrics(metrics)

    def check_run(self, cfg) -> None:
        super().check_run(cfg)
        if self.row_shards and not cfg.optimizer.get("reset_per_task", True):
            raise ConfigError(
                f"method {self.name} under trainer=fsdp needs optimizer.reset_per_task=true: the "
                "moments an optimizer carries over would move the frozen rows of each shard"
            )

    def on_train_start(self, trainer, pl_module) -> None:
        if self.mask is not None:
            frozen_entries_need_zero_decay(trainer, self.name)
            # an optimizer kept across tasks (optimizer.reset_per_task=false) carries moments that
            # would move frozen entries without a gradient: clear them there
            self.mask.clear_optimizer_state(trainer.optimizers, pl_module.model)

    def edit_gradients(self, module, views) -> None:
        if self.mask is not None:
            self.mask.apply(views)

    def on_task_end(self, module, task, task_index: int) -> None:
        self.mask = None
