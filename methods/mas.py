"""MAS: memory aware synapses (Aljundi et al. 2018, "Memory Aware Synapses: Learning what (not)
to forget", ECCV).

After task t, the importance of every parameter is the sensitivity of the squared norm of the
model's output to it, averaged over the task's inputs (no labels are needed):

    Omega_i^t = (1/N) sum_n | d ||f(x_n)||^2 / d theta_i |

f(x) is the vector of logits at the positions that predict the answer (methods/shared/importance.py,
``output_sensitivity``). Importances add up over tasks, Omega <- Omega + Omega^t, and theta* is
theta at the end of the latest task. On later tasks

    L = L_task + lambda * sum_i Omega_i (theta_i - theta*_i)^2.

This is EWC's machinery (methods/ewc.py) with Omega for F: the penalty's closed-form gradient
2 lambda Omega (theta - theta*) added at every optimizer step, the state as each process's rows
under FSDP, checkpointed, bf16 storage as an option. The paper's lambda is 1; conf/method/mas.yaml uses 1e-2.
On SmolLM2 both over-regularise (the penalty was 18-905x, then 0.8-12x the task loss, and little is
learnt after the first task): calibrate lambda_ on ``mas/penalty_to_task_loss``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cl_bench.training.parameter_views import ParameterViews
from methods.ewc import EWC
from methods.shared.importance import output_sensitivity, overall_mean


class MAS(EWC):
    name = "mas"

    def __init__(
        self,
        lambda_: float = 1.0,
        num_samples: int | None = 512,
        storage_dtype: str = "float32",
        param_patterns: Sequence[str] | None = None,
    ):
        # EWC's penalty is (lambda_ewc / 2) sum F d^2: lambda_ewc = 2 lambda gives MAS's lambda sum Omega d^2
        super().__init__(
            lambda_=2 * lambda_,
            mode="online",
            gamma=1.0,
            num_samples=num_samples,
            storage_dtype=storage_dtype,
            param_patterns=param_patterns,
        )

    def importance(self, module, task, params) -> dict[str, torch.Tensor]:
        omega, stats = output_sensitivity(
            module.model,
            module.pass_loader(task.train),
            params,
            self.num_samples,
        )
        module.log_metrics(
            {
                "mas/importance_s": stats["seconds"],
                "mas/importance_mean": overall_mean(omega, ParameterViews(module.model)),
            }
        )
        return omega
