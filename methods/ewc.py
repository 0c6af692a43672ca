"""EWC: elastic weight consolidation (Kirkpatrick et al. 2017, PNAS).

After task t: the diagonal empirical Fisher F_t at theta_t (methods/importance.py, over at most
``num_samples`` training examples of task t) and the anchor theta*_t = theta_t. On later tasks

    L = L_task + (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2

``mode: online`` (default) keeps one Fisher and one anchor, F <- gamma * F + F_t (gamma = 1);
``mode: separate`` keeps one (F_t, theta*_t) pair per past task and sums their penalties (memory
grows with T). ``storage_dtype: bfloat16`` halves the memory of both. TRACE's own EWC, which
estimates F from the training gradients, is methods/ewc_trace.py.

The penalty's gradient is closed-form, lambda * sum_i F_i (theta - theta*_i), so no autograd graph
is built for it: a parameter hook adds it to each micro-batch's gradient (scaled by 1 /
accumulate_grad_batches like the task loss), in place, through one scratch buffer. The penalty's
value is computed only on logging steps, for telemetry.

Under DDP (``shard_state: true``) each process keeps F and theta* only for its
share of the parameter tensors (balanced by size), estimates the Fisher only for those, and adds
world_size * lambda * F (theta - theta*) to their gradients; DDP's mean over processes then gives
every process exactly the penalty gradient, with 1 / world_size of the state per process (a 7B
model's fp32 Fisher and anchor are 56 GB). Checkpoints gather the shards on rank 0.
Under FSDP (``trainer=fsdp``) every process estimates F for the rows of its own parameter shards
through the sharded model (methods/importance.py: no process holds the whole model or a whole
gradient), keeps F and theta* as those rows, and adds lambda * F (theta - theta*) to its reduced
gradient shard once per optimizer step (the parameter hooks would not fire on sharded parameters).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from cl_bench.distributed import is_distributed, rank, world_size
from cl_bench.errors import check_choice, check_number
from cl_bench.training.sharding import gather_rows, local, rows_of_shards
from methods.base import CLMethod, trainable_bytes
from methods.importance import check_fisher_args, diagonal_fisher, overall_mean
from methods.masking import select_parameters

MODES = ("online", "separate")
STORAGE_DTYPES = ("float32", "bfloat16")


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
        shard_state: bool = True,
    ):
        self.lambda_ = float(check_number(lambda_, "method.lambda_", low=0))
        self.gamma = check_number(gamma, "method.gamma", low=0, high=1)
        self.mode = check_choice(mode, MODES, "method.mode")
        self.dtype = getattr(torch, check_choice(storage_dtype, STORAGE_DTYPES, "method.storage_dtype"))
        check_fisher_args(fisher, num_samples, "method")
        self.fisher_mode, self.num_samples = fisher, num_samples
        self.param_patterns = None if param_patterns is None else list(param_patterns)
        self.shard_state = shard_state
        #: [(F, theta*)] per consolidated task (one entry in online mode)
        self.consolidated: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        self.params: dict[str, torch.nn.Parameter] = {}
        self.handles: list = []
        #: one flat buffer per dtype, as large as the largest parameter: theta - theta* without allocating
        self.scratch: dict[torch.dtype, torch.Tensor] = {}
        #: 1 / accumulate_grad_batches of the current fit (Lightning scales the task loss the same way)
        self.grad_scale = 1.0

    def _params(self, module) -> dict[str, torch.nn.Parameter]:
        """The parameters this process keeps state for (its share when the state is sharded)."""
        if self.row_shards:  # FSDP replaces the parameters at its first fit: look them up each time
            self.params = select_parameters(module.model, self.param_patterns, "method.param_patterns")
        if not self.params:
            params = select_parameters(module.model, self.param_patterns, "method.param_patterns")
            if self.sharded:
                owner = shard_by_size({n: p.numel() for n, p in params.items()}, world_size())
                params = {n: p for n, p in params.items() if owner[n] == rank()}
            self.params = params
        return self.params

    @property
    def sharded(self) -> bool:
        """Whole tensors owned by one process each (DDP); FSDP's row shards are :attr:`row_shards`."""
        return self.shard_state and is_distributed() and not self.row_shards

    def on_stream_start(self, module, stream) -> None:
        self._params(module)

    # --- the penalty: its value on logging steps, its gradient through parameter hooks ---------
    def penalty(self, module, batch, task_loss):
        if self.consolidated and module.should_log:
            value = self.penalty_value()
            module.log_metrics({f"{self.name}/penalty": value,
                                f"{self.name}/penalty_to_task_loss": value / max(task_loss.item(), 1e-12)})
        return None

    @torch.no_grad()
    def penalty_value(self) -> float:
        """(lambda / 2) * sum_i F_i (theta - theta*_i)^2 at the current weights."""
        total = 0.0
        for fisher, anchor in self.consolidated:
            for n, p in self.params.items():
                diff = self._diff(local(p), anchor[n])
                total += torch.dot(fisher[n].flatten().to(diff.dtype), diff.square_().flatten()).item()
        if self.sharded or (self.row_shards and is_distributed()):
            box = torch.tensor([total], dtype=torch.float64, device=next(iter(self.params.values())).device)
            dist.all_reduce(box)
            total = box.item()
        return 0.5 * self.lambda_ * total

    def _diff(self, p: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """theta - theta*, written into the scratch buffer when there is one (no allocation)."""
        if p.dtype not in self.scratch:
            return p.detach() - anchor
        return torch.sub(p.detach(), anchor, out=self.scratch[p.dtype][: p.numel()].view(p.shape))

    def _add_penalty_grad(self, grad: torch.Tensor, name: str, p: torch.Tensor) -> None:
        """grad += (lambda / accumulate_grad_batches) * sum_i F_i (theta - theta*_i), in place."""
        for fisher, anchor in self.consolidated:
            grad.addcmul_(fisher[name], self._diff(p, anchor[name]), value=self.lambda_ * self.grad_scale)

    def on_task_start(self, module, task, task_index: int) -> None:
        if self.consolidated and not self.row_shards:
            self.handles = [p.register_post_accumulate_grad_hook(self._penalty_hook(n))
                            for n, p in self._params(module).items()]

    def on_train_start(self, trainer, pl_module) -> None:
        """The model is on its training device now: put the state and the scratch buffers there."""
        # Lightning divides the task loss by the accumulation; DDP averages over processes, which
        # a sharded penalty (added on one process only) makes up for.
        self.grad_scale = (world_size() if self.sharded else 1.0) / trainer.accumulate_grad_batches
        device = pl_module.device
        self.place_state(device)
        if self.row_shards:
            self._params(pl_module)
            self.consolidated = [(rows_of_shards(fisher, self.params), rows_of_shards(anchor, self.params))
                                 for fisher, anchor in self.consolidated]
            return
        largest: dict[torch.dtype, int] = {}
        for p in self.params.values():
            largest[p.dtype] = max(largest.get(p.dtype, 0), p.numel())
        self.scratch = {dtype: torch.empty(n, dtype=dtype, device=device) for dtype, n in largest.items()}

    def place_state(self, device: torch.device) -> None:
        """Move the consolidated Fisher and anchors to ``device``."""
        self.consolidated = [({n: f.to(device) for n, f in fisher.items()}, {n: a.to(device) for n, a in anchor.items()})
                             for fisher, anchor in self.consolidated]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        """Under FSDP: the penalty's gradient on each (reduced) gradient shard, once per step."""
        if not (self.row_shards and self.consolidated):
            return
        for n, p in self._params(pl_module).items():
            if p.grad is not None:
                for fisher, anchor in self.consolidated:
                    local(p.grad).addcmul_(fisher[n], local(p).detach() - anchor[n], value=self.lambda_)

    def _penalty_hook(self, name: str):
        def hook(p):
            self._add_penalty_grad(p.grad, name, p)
        return hook

    # --- consolidation after each task -------------------------------------------------------
    def release_hooks(self) -> None:
        """End of a task's training: remove the hooks and the scratch buffers."""
        for h in self.handles:
            h.remove()
        self.handles, self.scratch = [], {}

    def on_task_end(self, module, task, task_index: int) -> None:
        self.release_hooks()
        params = self._params(module)  # under FSDP F and theta* are this process's rows of them
        anchor = {n: local(p).detach().to(self.dtype).clone() for n, p in params.items()}
        new = self.importance(module, task, params)
        if self.mode == "separate" or not self.consolidated:
            self.consolidated.append(({n: f.to(self.dtype) for n, f in new.items()}, anchor))
        else:
            old, _ = self.consolidated[0]
            self.consolidated = [({n: (self.gamma * old[n].float() + new[n]).to(self.dtype) for n in new}, anchor)]

    def importance(self, module, task, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
        """F_t: the diagonal Fisher of ``params`` on ``task``'s training data, at the current weights."""
        fisher, stats = diagonal_fisher(module.model, module.pass_loader(task.train), params, self.fisher_mode,
                                        self.num_samples, average_ranks=not self.sharded)
        module.log_metrics({f"{self.name}/fisher_s": stats["seconds"],
                            f"{self.name}/fisher_mean": overall_mean(fisher, split=self.sharded or self.row_shards)})
        return fisher

    def planned_state(self, model, world, tasks):
        """F and theta*, split over the processes by ``shard_state`` (DDP) or kept as each shard's
        rows (FSDP, where theta - theta* is one shard's temporary rather than a buffer)."""
        pairs = 1 if self.mode == "online" else max(tasks - 1, 1)
        share = world if self.shard_state or self.row_shards else 1
        state = {f"F and theta* ({pairs} pair(s), {str(self.dtype)[6:]})":
                 2 * pairs * trainable_bytes(model, self.dtype.itemsize) // share}
        if self.row_shards:
            return state
        return {**state, "theta - theta* buffer": max(p.numel() * p.element_size() for p in model.parameters()
                                                      if p.requires_grad)}

    def planned_pass(self, model, world):
        """The estimate (fp32) and one example's gradients, over this process's share of the
        parameters (DDP's ``shard_state``) or its rows (FSDP: the pass runs through the sharded model)."""
        share = world if self.shard_state or self.row_shards else 1
        return {"importance pass: F + gradients": (trainable_bytes(model, 4) + trainable_bytes(model)) // share}

    def state_dict(self):
        """The whole state; a sharded one is gathered on rank 0 (which writes checkpoints)."""
        consolidated = self.consolidated
        if self.row_shards and is_distributed() and self.params:
            consolidated = [(gather_rows(fi, self.params), gather_rows(an, self.params)) for fi, an in consolidated]
        elif self.sharded:
            local = [({n: f.cpu() for n, f in fi.items()}, {n: a.cpu() for n, a in an.items()}) for fi, an in consolidated]
            parts = [None] * world_size() if rank() == 0 else None
            dist.gather_object(local, parts, dst=0)
            if rank() == 0:
                consolidated = [({n: f for p in parts for n, f in p[t][0].items()},
                                 {n: a for p in parts for n, a in p[t][1].items()}) for t in range(len(local))]
        return {"consolidated": consolidated}

    def load_state_dict(self, state_dict) -> None:
        """Restore a whole state (a sharded process keeps its own share of it)."""
        keep = set(self.params) if self.sharded else None
        self.consolidated = [({n: f for n, f in fi.items() if keep is None or n in keep},
                              {n: a for n, a in an.items() if keep is None or n in keep})
                             for fi, an in state_dict["consolidated"]]


def shard_by_size(sizes: dict[str, int], world: int) -> dict[str, int]:
    """Owner process of each tensor: largest first, each to the least-loaded process (deterministic)."""
    load = [0] * world
    owner = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[name] = r
        load[r] += sizes[name]
    return owner

