"""EWC as TRACE implements it (Wang et al. 2023, TRACE; its ``model/Regular/EWC.py``), for
comparing with TRACE's numbers. The penalty is EWC's (methods/ewc.py), from the second task on,

    L = L_task + (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2,      lambda = 400,

but F is no Fisher pass after a task. It starts at zero, in the model's dtype, and after every
training micro-batch m, of every epoch of every task, grows by that micro-batch's gradient
(penalty included, as scaled for accumulation, NaN set to 0) squared over the task's number of
micro-batches per epoch L:

    F <- F + nan_to_num(g_m)^2 / L

It is never reset, so it grows with epochs and tasks, and the penalty uses it live (the current
task's micro-batches included). theta* is theta before the first task, then at the end of each
task. Each process keeps its own F from its own micro-batch gradients, as TRACE's processes do.

Since TRACE adds the penalty to every micro-batch's loss and squares every micro-batch's gradient,
both happen in a hook on each parameter's gradient (so single device and DDP only), not in the
once-per-step gradient edit of methods/ewc.py; the penalty's value is EWC's (``anchored_penalty``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cl_bench.errors import check_number
from cl_bench.training.parameter_views import ParameterViews
from methods.base import CLMethod, trainable_bytes
from methods.ewc import anchored_penalty
from methods.shared.masking import select_parameters


class TraceEWC(CLMethod):
    name = "ewc_trace"
    supported_strategies = ("single_device", "ddp")  # F from hooks on the parameters' gradients
    trains_lora = True  # F and theta* over the trainable weights: the adapters under LoRA

    def __init__(self, lambda_: float = 400.0, param_patterns: Sequence[str] | None = None):
        self.lambda_ = float(check_number(lambda_, "method.lambda_", low=0))
        self.param_patterns = None if param_patterns is None else list(param_patterns)
        #: F and theta*, live: the penalty reads them as they are updated
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        #: the penalty applies from the second task on
        self.active = False
        self.params: dict[str, torch.nn.Parameter] = {}
        self.handles: list = []
        #: micro-batches per epoch of the current task (TRACE's len(train_dataloader)), and the
        #: 1 / accumulate_grad_batches Lightning scales each micro-batch's loss by
        self.batches_per_epoch, self.grad_scale = 1, 1.0

    def on_stream_start(self, module, stream) -> None:
        self.params = select_parameters(module.model, self.param_patterns, "method.param_patterns")
        self.fisher = {n: torch.zeros_like(p, memory_format=torch.contiguous_format) for n, p in self.params.items()}
        self.anchor = {n: p.detach().clone() for n, p in self.params.items()}

    def on_task_start(self, module, task, task_index: int) -> None:
        self.active = task_index > 0
        self.handles = [p.register_hook(self._square_hook(n, p)) for n, p in self.params.items()]

    def on_train_start(self, trainer, pl_module) -> None:
        self.batches_per_epoch = max(int(trainer.num_training_batches), 1)
        self.grad_scale = 1.0 / trainer.accumulate_grad_batches
        device = pl_module.device
        self.fisher = {n: f.to(device) for n, f in self.fisher.items()}
        self.anchor = {n: a.to(device) for n, a in self.anchor.items()}

    def _square_hook(self, name: str, p: torch.nn.Parameter):
        def hook(grad):
            if self.active:  # the penalty's gradient, from F as it is before this micro-batch
                grad = grad.clone()  # a hook must not edit its argument
                grad.addcmul_(self.fisher[name], p.detach() - self.anchor[name], value=self.lambda_ * self.grad_scale)
            self.fisher[name].add_(torch.nan_to_num(grad.detach(), nan=0.0).square() / self.batches_per_epoch)
            return grad

        return hook

    def penalty(self, module, batch, task_loss):
        if self.active and module.should_log:
            views = ParameterViews(module.model)
            value = 0.5 * self.lambda_ * views.total(anchored_penalty(views, [(self.fisher, self.anchor)]))
            module.log_metrics(
                {
                    f"{self.name}/penalty": value,
                    f"{self.name}/penalty_to_task_loss": value / max(task_loss.item(), 1e-12),
                }
            )
        return None

    def on_task_end(self, module, task, task_index: int) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.active = [], False
        self.anchor = {n: p.detach().clone() for n, p in self.params.items()}

    def planned_state(self, model, world, tasks):
        return {"F and theta* (model dtype)": 2 * trainable_bytes(model)}

    def state_dict(self):
        return {"fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state_dict) -> None:
        self.fisher, self.anchor = state_dict["fisher"], state_dict["anchor"]
