"""EWC: elastic weight consolidation (Kirkpatrick et al. 2017, PNAS).

After task t: the diagonal empirical Fisher F_t at theta_t (methods/shared/importance.py, over at most
``num_samples`` training examples of task t) and the anchor theta*_t = theta_t. On later tasks

    L = L_task + (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2

``mode: online`` (default) keeps one Fisher and one anchor, F <- gamma * F + F_t (gamma = 1);
``mode: separate`` keeps one (F_t, theta*_t) pair per past task and sums their penalties (memory
grows with T). ``storage_dtype: bfloat16`` halves the memory of both. TRACE's own EWC, which
estimates F from the training gradients, is methods/ewc_trace.py.

The penalty's gradient is closed-form, lambda * sum_i F_i (theta - theta*_i), so no autograd graph
is built for it: it is added to each optimizer step's gradient (:meth:`edit_gradients`, after the
reduction over processes), in place, through one scratch buffer; the penalty's value is computed
only on logging steps, for telemetry. Under DDP every process keeps the whole F and theta*; under
FSDP (``trainer=fsdp``) every process estimates F for the rows of its own parameter shards through
the sharded model (methods/shared/importance.py: no process holds the whole model or a whole gradient)
and keeps F and theta* as those rows (cl_bench/training/parameter_views.py). DDP's former
``shard_state`` (each process keeping the state of a share of the tensors) is retired: FSDP covers
that memory case and shards the weights and optimizer state as well (docs/scaling.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cl_bench.errors import check_choice, check_number
from cl_bench.training.parameter_views import ParameterViews, place_state, whole_state
from methods.base import CLMethod, tensor_bytes, trainable_bytes
from methods.shared.importance import check_fisher_args, diagonal_fisher, overall_mean
from methods.shared.masking import select_parameters

MODES = ("online", "separate")
STORAGE_DTYPES = ("float32", "bfloat16")


def anchored_penalty(
    views: ParameterViews, pairs: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]], diff=None
) -> torch.Tensor:
    """sum over the (F, theta*) pairs and their entries of F (theta - theta*)^2, over the entries
    this process holds (float64; ``views.total`` adds it up over processes). ``diff(weights,
    anchor)`` computes theta - theta* (a plain subtraction by default)."""
    total = 0.0
    for fisher, anchor in pairs:
        for n, p in views.parameters(fisher).items():
            d = views.weight(p) - anchor[n] if diff is None else diff(views.weight(p), anchor[n])
            total += torch.dot(fisher[n].flatten().to(d.dtype), d.square_().flatten()).item()
    return torch.tensor(total, dtype=torch.float64)


class EWC(CLMethod):
    name = "ewc"
    supported_strategies = ("single_device", "ddp", "fsdp")
    trains_lora = True  # F and theta* over the trainable weights: the adapters under LoRA

    def __init__(
        self,
        lambda_: float = 1.0e5,
        mode: str = "online",
        gamma: float = 1.0,
        fisher: str = "per_sample",
        num_samples: int = 512,
        storage_dtype: str = "float32",
        param_patterns: Sequence[str] | None = None,
    ):
        self.lambda_ = float(check_number(lambda_, "method.lambda_", low=0))
        self.gamma = check_number(gamma, "method.gamma", low=0, high=1)
        self.mode = check_choice(mode, MODES, "method.mode")
        self.dtype = getattr(torch, check_choice(storage_dtype, STORAGE_DTYPES, "method.storage_dtype"))
        check_fisher_args(fisher, num_samples, "method")
        self.fisher_mode, self.num_samples = fisher, num_samples
        self.param_patterns = None if param_patterns is None else list(param_patterns)
        #: [(F, theta*)] per consolidated task (one entry in online mode), placed as the views are
        self.consolidated: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        #: the names of the parameters the state covers, and the model they belong to
        self.names: list[str] = []
        self.model: torch.nn.Module | None = None
        #: one flat buffer per dtype, as large as the largest parameter view: theta - theta* without allocating
        self.scratch: dict[torch.dtype, torch.Tensor] = {}

    def _params(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        params = select_parameters(model, self.param_patterns, "method.param_patterns")
        self.names = list(params)
        return params

    def on_stream_start(self, module, stream) -> None:
        self.model = module.model
        self._params(module.model)

    # --- the penalty: its value on logging steps, its gradient at every optimizer step -----------
    def penalty(self, module, batch, task_loss):
        if self.consolidated and module.should_log:
            value = self.penalty_value(ParameterViews(module.model))
            module.log_metrics(
                {
                    f"{self.name}/penalty": value,
                    f"{self.name}/penalty_to_task_loss": value / max(task_loss.item(), 1e-12),
                }
            )
        return None

    @torch.no_grad()
    def penalty_value(self, views: ParameterViews) -> float:
        """(lambda / 2) * sum_i F_i (theta - theta*_i)^2 at the current weights."""
        return 0.5 * self.lambda_ * views.total(anchored_penalty(views, self.consolidated, self._diff))

    def _diff(self, weights: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """theta - theta*, written into the scratch buffer when there is one (no allocation)."""
        if weights.dtype not in self.scratch:
            return weights - anchor
        return torch.sub(weights, anchor, out=self.scratch[weights.dtype][: weights.numel()].view(weights.shape))

    @torch.no_grad()
    def edit_gradients(self, module, views: ParameterViews) -> None:
        """grad += lambda * sum_i F_i (theta - theta*_i), in place, on the step's gradient."""
        for n, (weights, grad) in views.gradients(self.names).items():
            for fisher, anchor in self.consolidated:
                grad.addcmul_(fisher[n], self._diff(weights, anchor[n]), value=self.lambda_)

    def on_train_start(self, trainer, pl_module) -> None:
        """The model is on its training device (and sharded under FSDP) now: place the state there,
        and a scratch buffer per dtype as large as the largest parameter view."""
        model = pl_module.model
        self.consolidated = [
            (place_state(fisher, model), place_state(anchor, model)) for fisher, anchor in self.consolidated
        ]
        largest: dict[torch.dtype, int] = {}
        views = ParameterViews(model)
        for p in views.parameters(self.names).values():
            weights = views.weight(p)
            largest[weights.dtype] = max(largest.get(weights.dtype, 0), weights.numel())
        self.scratch = {dtype: torch.empty(n, dtype=dtype, device=pl_module.device) for dtype, n in largest.items()}

    def on_train_end(self, trainer, pl_module) -> None:
        self.scratch = {}

    # --- consolidation after each task -------------------------------------------------------
    def on_task_end(self, module, task, task_index: int) -> None:
        views = ParameterViews(module.model)
        params = self._params(module.model)  # under FSDP F and theta* are this process's rows of them
        anchor = {n: views.weight(p).to(self.dtype).clone() for n, p in params.items()}
        new = self.importance(module, task, params)
        if self.mode == "separate" or not self.consolidated:
            self.consolidated.append(({n: f.to(self.dtype) for n, f in new.items()}, anchor))
        else:
            old, _ = self.consolidated[0]
            self.consolidated = [({n: (self.gamma * old[n].float() + new[n]).to(self.dtype) for n in new}, anchor)]

    def importance(self, module, task, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
        """F_t: the diagonal Fisher of ``params`` on ``task``'s training data, at the current weights."""
        fisher, stats = diagonal_fisher(
            module.model, module.pass_loader(task.train), params, self.fisher_mode, self.num_samples
        )
        module.log_metrics(
            {
                f"{self.name}/fisher_s": stats["seconds"],
                f"{self.name}/fisher_mean": overall_mean(fisher, ParameterViews(module.model)),
            }
        )
        return fisher

    def planned_state(self, model, world, tasks):
        """F and theta*, whole on every process (DDP) or each shard's rows (FSDP), and the scratch
        buffer for theta - theta* (the largest parameter, or its rows)."""
        pairs = 1 if self.mode == "online" else max(tasks - 1, 1)
        share = world if self.row_shards else 1
        return {
            f"F and theta* ({pairs} pair(s), {str(self.dtype)[6:]})": 2
            * pairs
            * trainable_bytes(model, self.dtype.itemsize)
            // share,
            "theta - theta* buffer": max(tensor_bytes([p]) for p in model.parameters() if p.requires_grad) // share,
        }

    def planned_pass(self, model, world):
        """The estimate (fp32) and one example's gradients, over the whole model (DDP) or this
        process's rows (FSDP: the pass runs through the sharded model)."""
        share = world if self.row_shards else 1
        return {"importance pass: F + gradients": (trainable_bytes(model, 4) + trainable_bytes(model)) // share}

    def state_dict(self):
        """The whole state (under FSDP gathered from every process's rows: every process calls this)."""
        model = self.model
        return {"consolidated": [(whole_state(fi, model), whole_state(an, model)) for fi, an in self.consolidated]}

    def load_state_dict(self, state_dict) -> None:
        """Restore a whole state; it is placed at the next fit's start."""
        self.consolidated = [(dict(fi), dict(an)) for fi, an in state_dict["consolidated"]]
