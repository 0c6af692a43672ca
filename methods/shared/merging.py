"""Continual model merging: what the merging methods share (task_arithmetic, ties, magmax, opcm,
fisher_merge).

After every task t the weights the task was fine-tuned to, theta_t, give the task vector
tau_t = theta_t - theta_0 against the pretrained weights theta_0 (kept from the stream's start).
The method folds tau_t into its running merge (its own state) and writes the merged weights
theta^(t), which are evaluated after the task and carried on:

    task t trains from    theta_0 (starts_from: pretrained, independent fine-tuning), or
                          theta_{t-1} (starts_from: finetuned, sequential fine-tuning)
    tau_t   = theta_t - theta_0
    theta^(t) = fold(state, tau_t)                    evaluated after task t

Only the trainable parameters are merged (the others never move). The state (theta_0, the running
merge, the last fine-tuned weights where the next task starts from them) is float32 on the host, as the
references keep their models on the CPU; under FSDP each process keeps its own rows of every
tensor (placed as the other methods' per-entry state), gathered whole for a checkpoint. A merge
that needs a whole tensor (OPCM's SVD of a layer, TIES's top-k over the whole model) gathers it,
computes on it and keeps its own rows of the result (:meth:`MergingMethod.whole`, :meth:`rows`).

Each merge is logged: its seconds, the norm of the task vector and of the merged one
(``<method>/merge_s``, ``/task_vector_norm``, ``/merged_vector_norm``), and kept in results.json's
``method.merges``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from cl_bench.errors import ConfigError
from cl_bench.training.method import CLMethod, trainable_bytes
from cl_bench.training.parameter_views import ParameterViews

STARTS = ("pretrained", "finetuned")


def host(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 copy of ``tensor`` in host memory."""
    return tensor.detach().to("cpu", torch.float32, copy=True)


def squared_norm(views: ParameterViews, vector: dict[str, torch.Tensor]) -> float:
    """||vector||^2 over every entry, every process's rows added up (a collective under FSDP)."""
    return views.total(sum((t.double().square().sum() for t in vector.values()), torch.zeros((), dtype=torch.float64)))


class MergingMethod(CLMethod):
    """Base of the merging methods: theta_0, the task vector of each task, the writes; a method
    supplies :meth:`fold` (and lists its per-entry state in :attr:`per_entry`)."""

    merges = True
    supported_strategies = ("single_device", "ddp", "fsdp")
    lora_refusal = (
        "the merging references merge full weights; a merge of LoRA adapters' deltas (B A) is no adapter "
        "of their rank and would have to be written into the frozen base weights"
    )
    #: sequential fine-tuning (MagMax) or independent fine-tuning from theta_0 (the others)
    starts_from = "pretrained"
    #: names of the attributes holding per-entry state (name -> tensor dicts), besides theta_0
    per_entry: tuple[str, ...] = ()
    #: float32 copies of the trainable weights the state holds in host memory (``runners.plan``)
    host_copies = 2

    def __init__(self) -> None:
        #: the merged parameters' names (every trainable one)
        self.names: list[str] = []
        #: theta_0, the weights before the first task
        self.pretrained: dict[str, torch.Tensor] = {}
        #: theta_{t-1}, the last task's fine-tuned weights, where the next task starts (starts_from: finetuned)
        self.last_tuned: dict[str, torch.Tensor] = {}
        #: per merge: the task, its seconds and the two norms (results.json's ``method.merges``)
        self.merges_done: list[dict[str, Any]] = []
        self.model: torch.nn.Module | None = None

    def check_run(self, cfg: Any) -> None:
        super().check_run(cfg)
        if cfg.tasks.get("joint", False):
            raise ConfigError(
                f"method {self.name} merges what each task of the stream taught; tasks.joint=true trains their "
                "union as one task, which leaves nothing to merge"
            )
        if not cfg.optimizer.get("reset_per_task", True):
            raise ConfigError(
                f"method {self.name} fine-tunes each task as its own run (a fresh optimizer, as its reference "
                "does); optimizer.reset_per_task must be true"
            )

    def on_stream_start(self, module, stream) -> None:
        self.model = module.model
        views = ParameterViews(module.model)
        params = views.parameters()
        self.names = list(params)
        if not self.pretrained:  # a resume restores it (the same weights) right after
            self.pretrained = {n: host(views.weight(p)) for n, p in params.items()}

    # --- state in this process's rows ------------------------------------------------------------
    def rows(self, views: ParameterViews, params: dict[str, torch.Tensor], whole: dict[str, torch.Tensor]):
        """``whole`` tensors cut to the rows this process holds (FSDP; a tensor already cut, or not
        sharded, as it is)."""
        out = {}
        for n, t in whole.items():
            part = views.rows(params[n], t)
            out[n] = part.clone() if part.shape != t.shape else t
        return out

    def whole(
        self, views: ParameterViews, state: dict[str, torch.Tensor], cut: bool = False
    ) -> dict[str, torch.Tensor]:
        """``state`` whole on every process (FSDP gathers the rows: every process calls it); ``cut``:
        it is known to be rows (placed), so every process gathers whatever its shapes."""
        return views.whole_rows(state, cut=cut)

    def state_names(self) -> tuple[str, ...]:
        return ("pretrained", "last_tuned", *self.per_entry)

    def place(self, views: ParameterViews, params: dict[str, torch.Tensor]) -> None:
        for attr in self.state_names():
            setattr(self, attr, self.rows(views, params, getattr(self, attr)))

    def on_train_start(self, trainer, pl_module) -> None:
        """The model is sharded now (FSDP, from the first fit on): from here each process keeps only
        its rows of theta_0 and of a restored state (both whole before)."""
        views = ParameterViews(pl_module.model)
        self.place(views, views.parameters(self.names))

    # --- the seam ------------------------------------------------------------------------------
    def fold(
        self,
        module,
        views: ParameterViews,
        params: dict[str, torch.Tensor],
        tuned: dict[str, torch.Tensor],
        vector: dict[str, torch.Tensor],
        task,
        t: int,
    ) -> dict[str, torch.Tensor]:
        """Fold task ``t``'s fine-tuned weights ``tuned`` and task vector ``vector`` (this process's
        rows, float32, host) into the state; return the merged weights theta^(t) (the same rows)."""
        raise NotImplementedError

    @torch.no_grad()
    def write(self, views: ParameterViews, params: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
        for n, p in params.items():
            w = views.weight(p)
            w.copy_(weights[n].to(w.device, w.dtype))

    def merge(self, module, task, task_index: int) -> None:
        start = time.perf_counter()
        views = ParameterViews(module.model)
        params = views.parameters(self.names)
        self.place(views, params)
        with torch.no_grad():
            tuned = {n: host(views.weight(p)) for n, p in params.items()}
            vector = {n: tuned[n] - self.pretrained[n] for n in tuned}
        merged = self.fold(module, views, params, tuned, vector, task, task_index)
        if self.starts_from == "finetuned":
            self.last_tuned = tuned
        self.write(views, params, merged)
        with torch.no_grad():
            merged_norm = squared_norm(views, {n: merged[n] - self.pretrained[n] for n in merged})
        record = {
            "task": task.name,
            "merge_s": time.perf_counter() - start,
            "task_vector_norm": math.sqrt(squared_norm(views, vector)),
            "merged_vector_norm": math.sqrt(merged_norm),
        }
        self.merges_done.append(record)
        module.log_metrics({f"{self.name}/{k}": v for k, v in record.items() if k != "task"})

    def start_weights(self, module, task, task_index: int) -> None:
        """theta_0 (independent fine-tuning) or theta_{t-1} (sequential)."""
        views = ParameterViews(module.model)
        params = views.parameters(self.names)
        self.place(views, params)
        self.write(views, params, self.pretrained if self.starts_from == "pretrained" else self.last_tuned)

    # --- plan, report, checkpoint --------------------------------------------------------------
    def planned_host(self, model, world, tasks):
        """The state's float32 copies of the trainable weights, each process's rows under FSDP."""
        share = world if self.row_shards else 1
        return {
            f"merge state ({self.host_copies} float32 copies)": self.host_copies * trainable_bytes(model, 4) // share
        }

    def report(self) -> dict[str, Any]:
        return {"starts_from": self.starts_from, "merges": list(self.merges_done)}

    def state_dict(self) -> dict[str, Any]:
        """The whole state (FSDP: gathered from every process's rows; every process calls it)."""
        views = ParameterViews(self.model) if self.model is not None else None
        state = {
            a: getattr(self, a) if views is None else self.whole(views, getattr(self, a)) for a in self.state_names()
        }
        return {**state, "merges": list(self.merges_done)}

    def load_state_dict(self, state_dict) -> None:
        """Restore a whole state; it is cut to this process's rows at the next merge or start."""
        for attr in self.state_names():
            setattr(self, attr, dict(state_dict[attr]))
        self.merges_done = list(state_dict["merges"])
