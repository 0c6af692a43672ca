"""Fisher merging (Matena & Raffel, NeurIPS 2022), merged after every task over the tasks seen so
far, with fusion_bench's merge rule (fusion_bench/method/fisher_merging/fisher_merging.py,
``merging_with_fisher_weights``).

Each task is fine-tuned from the pretrained weights theta_0; after task t, F_t is the diagonal
Fisher at theta_t on task t's training data (EWC's estimate, methods/shared/importance.py, over a
seeded sample of ``num_samples`` examples), and

    F^_i = F_i + eps,   w_i = 1 / (||F_i|| + eps)        (``normalize_fisher_weight``; else w_i = 1)
    theta^(t) = sum_{i <= t} w_i F^_i theta_i / sum_{i <= t} w_i F^_i      evaluated after task t

kept as the two running sums. The reference's uniform scaling coefficients and its normalisation
of the w_i over the models are common factors of both sums, and cancel. eps = 1e-6
(``minimal_fisher_weight``) and 256 examples are its config's.
"""

from __future__ import annotations

import math

import torch

from cl_bench.errors import check_flag, check_number
from cl_bench.rng import derive_seed
from methods.base import trainable_bytes
from methods.shared.importance import check_fisher_args, diagonal_fisher, overall_mean, sample_examples
from methods.shared.merging import MergingMethod, squared_norm


class FisherMerge(MergingMethod):
    name = "fisher_merge"
    starts_from = "pretrained"
    per_entry = ("weighted_sum", "weight_sum")
    host_copies = 3  # theta_0 and the two sums

    def __init__(
        self,
        fisher: str = "batch",
        num_samples: int | None = 256,
        minimal_fisher_weight: float = 1.0e-6,
        normalize_fisher_weight: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        check_fisher_args(fisher, num_samples, "method")
        self.fisher, self.num_samples, self.seed = fisher, num_samples, seed
        self.eps = float(check_number(minimal_fisher_weight, "method.minimal_fisher_weight", low=0))
        self.normalize = check_flag(normalize_fisher_weight, "method.normalize_fisher_weight")
        #: sum_i w_i F^_i theta_i and sum_i w_i F^_i (empty before the first task)
        self.weighted_sum: dict[str, torch.Tensor] = {}
        self.weight_sum: dict[str, torch.Tensor] = {}

    def fold(self, module, views, params, tuned, vector, task, t):
        examples = sample_examples(task.train, self.num_samples, derive_seed(self.seed, t))
        fisher, stats = diagonal_fisher(module.model, module.pass_loader(examples), params, self.fisher, None)
        fisher = {n: f.to("cpu", torch.float32) for n, f in fisher.items()}
        with torch.no_grad():
            w = 1.0 / (math.sqrt(squared_norm(views, fisher)) + self.eps) if self.normalize else 1.0
            for n, f in fisher.items():
                weight = w * (f + self.eps)
                if n in self.weight_sum:
                    self.weighted_sum[n] += weight * tuned[n]
                    self.weight_sum[n] += weight
                else:
                    self.weighted_sum[n], self.weight_sum[n] = weight * tuned[n], weight
        module.log_metrics(
            {
                f"{self.name}/fisher_s": stats["seconds"],
                f"{self.name}/fisher_mean": overall_mean(fisher, views),
                f"{self.name}/fisher_weight": w,
            }
        )
        return {n: self.weighted_sum[n] / self.weight_sum[n] for n in tuned}

    def planned_pass(self, model, world):
        """The Fisher (fp32) and one batch's gradients, this process's rows under FSDP (EWC's pass)."""
        share = world if self.row_shards else 1
        return {"Fisher pass: F + gradients": (trainable_bytes(model, 4) + trainable_bytes(model)) // share}
