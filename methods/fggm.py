"""FGGM: Fisher-guided gradient masking (Tan et al. 2026, arXiv 2601.18261).

Before training task t (t >= 2 by default), at theta_{t-1} and on task t's own training data:

    F_i = (1/N) sum_n (d log p(y_n | x_n; theta_{t-1}) / d theta_i)^2     (methods/shared/importance.py)
    s_r = sum_c F_{r,c}                 per output row of a 2-D weight ("mask normalization via
                                         output dimension"; aggregate=row, or column / element)
    thr = quantile(s, alpha)            over all tensors (quantile_scope=global) or per tensor
    m_r = [s_r > thr]                   update=top: the top 1 - alpha rows are trained
    g   <- m * g                        for every gradient of the task; the rest stays frozen

F is averaged over the task's whole training split (``num_samples: null``, as the paper's M_t), or
over a seeded uniform sample of ``num_samples`` examples. ``aggregate_reduce: mean`` scores a row
by its mean instead of its sum (the sum favours wide matrices); ``vectors`` says what happens to
1-D tensors (norms, biases: ranked with the rest and then mostly frozen, always trained, or frozen).

alpha = 0.7 (masking rate). ``update=bottom`` trains the lowest-Fisher rows instead (the reading
of "preserving critical parameters" in which high-Fisher rows are frozen). Frozen entries stay
bitwise unchanged: a fresh AdamW per task with zero moments, no weight decay (checked).
"""

from __future__ import annotations

from collections.abc import Sequence

from cl_bench.rng import derive_seed
from methods.base import trainable_bytes
from methods.shared.fixed_mask import FixedMaskMethod
from methods.shared.importance import check_fisher_args, diagonal_fisher, sample_examples


class FGGM(FixedMaskMethod):
    name = "fggm"

    def __init__(
        self,
        alpha: float = 0.7,
        aggregate: str = "row",
        quantile_scope: str = "global",
        update: str = "top",
        fisher: str = "batch",
        num_samples: int | None = None,
        skip_first_task: bool = True,
        param_patterns: Sequence[str] | None = None,
        aggregate_reduce: str = "sum",
        vectors: str = "mask",
        seed: int = 0,
    ):
        super().__init__(
            alpha=alpha,
            aggregate=aggregate,
            quantile_scope=quantile_scope,
            update=update,
            skip_first_task=skip_first_task,
            param_patterns=param_patterns,
            aggregate_reduce=aggregate_reduce,
            vectors=vectors,
        )
        check_fisher_args(fisher, num_samples, "method")
        self.fisher, self.num_samples, self.seed = fisher, num_samples, seed

    def scores(self, module, task, params):
        examples = sample_examples(task.train, self.num_samples, derive_seed(self.seed, self.task_index))
        fisher, stats = diagonal_fisher(module.model, module.pass_loader(examples), params, self.fisher, None)
        module.log_metrics({"fggm/fisher_s": stats["seconds"], "fggm/fisher_samples": stats["samples"]})
        return fisher

    def planned_pass(self, model, world):
        """The scores (the Fisher, fp32) and the gradients of one example or batch (``fisher``),
        under FSDP of this process's rows."""
        what = "batch" if self.fisher == "batch" else "example"
        share = world if self.row_shards else 1
        return {
            **super().planned_pass(model, world),
            f"scoring pass: a {what}'s gradients": trainable_bytes(model) // share,
        }
