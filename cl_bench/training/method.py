"""The interface every continual-learning method implements.

A method is a Lightning :class:`~lightning.pytorch.callbacks.Callback` (so it can use every Lightning
hook) plus the moments a CL method needs that Lightning does not know about: the start and end of a
task of the stream, a penalty added to the task loss, and one seam for gradient edits at the
optimizer step. Every hook is a no-op here; a method overrides the ones its paper needs.

The runner calls ``method.on_stream_start(module, stream)`` once, before anything is trained
(validate settings against the model here), then, for each task t (0-based ``task_index``)::

    method.on_task_start(module, task, task_index)   # before trainer.fit; e.g. a Fisher pass
    trainer.fit(module, ...)                          # loss = method.training_loss(...): the task loss
                                                      # + method.penalty(...) unless it says otherwise;
                                                      # each optimizer step: method.edit_gradients(...)
    method.on_task_end(module, task, task_index)     # after fit; e.g. EWC's Fisher and anchor
    trainer.fit(module, method.after_task_epoch(...)) # when it returns examples (TRACE's replay epoch)
    method.merge(module, task, task_index)           # a merging method: the weights evaluated and carried
    (evaluate the stage)

A merging method (:attr:`merges`) replaces the weights after each task with a merge of what the
tasks taught (task vectors, a running merge, Fisher-weighted weights), kept as its own state; its
:attr:`starts_from` says what the next task fine-tunes from: the merged weights, the last task's
fine-tuned weights or the pretrained ones, which :meth:`start_weights` writes before that task's
``on_task_start``. The module calls both (``CLModule.merge_after_task``, ``start_task_weights``).

By default a fresh optimizer is created for every task (``configure_optimizers`` runs at each fit),
so a method never inherits Adam moments from a previous task. With ``optimizer.reset_per_task=false``
one optimizer runs the whole stream (TRACE's recipe): a method that promises frozen entries must
then clear their carried moments (methods/shared/fixed_mask.py does, through GradientMask).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from lightning.pytorch.callbacks import Callback

from cl_bench.distributed import strategy_family
from cl_bench.errors import ConfigError

if TYPE_CHECKING:
    from cl_bench.data.loaders import TaskLoaders
    from cl_bench.data.tasks import Example, Task, TaskStream
    from cl_bench.training.parameter_views import ParameterViews
    from cl_bench.training.processes import Processes


class TrainingModule(Protocol):
    """What a method may use of the LightningModule that trains the model (``CLModule``,
    cl_bench/training/module.py), which hands itself to every hook as ``module``."""

    model: torch.nn.Module
    loaders: TaskLoaders | None
    #: the task being trained (named in errors)
    task_name: str
    #: (logits, targets) of the current micro-batch at its labelled positions, inside ``penalty``
    step_logits: tuple[torch.Tensor, torch.Tensor] | None
    #: every position's logits of the micro-batch, inside ``penalty``, for a ``sequence_logits`` method
    step_sequence_logits: torch.Tensor | None
    #: this process's micro-batches per optimizer step, and the current one's place among them
    micro_batches_per_step: int
    micro_batch_in_step: int
    #: the run's processes: rank, world size, sums and averages over them (cl_bench/training/processes.py)
    processes: Processes

    @property
    def should_log(self) -> bool: ...

    @property
    def stream_step(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def pass_loader(self, examples: Sequence[Example]) -> torch.utils.data.DataLoader: ...

    def precision_context(self) -> contextlib.AbstractContextManager: ...

    def full_weights(self) -> contextlib.AbstractContextManager: ...

    def log_metrics(self, metrics: dict[str, float]) -> None: ...


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors`` in their own dtypes."""
    return sum(t.numel() * t.element_size() for t in tensors)


def trainable_bytes(model: torch.nn.Module, element: int | None = None) -> int:
    """Bytes of the trainable weights (at ``element`` bytes each, else their own dtype's)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return sum(p.numel() for p in trainable) * element if element else tensor_bytes(trainable)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every weight (a tied one once): what FSDP gathers for a pass over the whole model."""
    return tensor_bytes({id(p): p for p in model.parameters()}.values())


def refuse_weight_decay(method_name: str, weight_decay: float) -> None:
    """A method that freezes entries by masking gradients cannot have decoupled weight decay."""
    if weight_decay > 0:
        raise ConfigError(
            f"method {method_name} freezes entries by masking gradients; optimizer.weight_decay "
            f"must be 0 (it is {weight_decay}), or decoupled decay would move them"
        )


class CLMethod(Callback):
    """Base class of every strategy plugin; every hook does nothing."""

    #: Short name used in telemetry keys and error messages.
    name = "method"
    #: Trainer strategy families the method works under; the runner refuses others at start.
    supported_strategies: tuple[str, ...] = ("single_device", "ddp")
    #: True for a method that freezes entries by masking their gradients: decoupled weight decay
    #: would still move them, so ``optimizer.weight_decay`` must be 0.
    masks_gradients = False
    #: True for a method whose mechanism holds when only LoRA adapters train (``model.lora``);
    #: the others are refused at start until their state is defined on adapters.
    trains_lora = False
    #: why a method that does not train adapters refuses them (the error names it)
    lora_refusal = "its state is defined on the full weights"
    #: True for a method whose penalty reads every position's logits (``module.step_sequence_logits``),
    #: not only the answer's: the training forward pass then computes the head at every position
    sequence_logits = False
    #: the learning paradigms (``learning=``) the method's mechanism is defined under; the others are
    #: refused at start, with :attr:`learning_refusal`
    learning_paradigms: tuple[str, ...] = ("sft", "grpo", "self_sft")
    learning_refusal = ""
    #: True for a method whose :meth:`merge` replaces the weights after every task (model merging)
    merges = False
    #: what each task after the first trains from, for a merging method: "merged" (the weights
    #: evaluated after the previous task, as every other method), "finetuned" (the previous task's
    #: own fine-tuned weights: sequential fine-tuning) or "pretrained" (the weights before the first
    #: task: independent fine-tuning); :meth:`start_weights` writes the last two
    starts_from = "merged"
    #: set by :meth:`check_run`: the run shards by rows (``trainer=fsdp``), known before the model
    #: exists, for planning (``planned_*``) and refusals at start; at run time the framework places
    #: gradients and per-entry state (cl_bench/training/parameter_views.py: ParameterViews.sharded)
    row_shards = False

    def check_run(self, cfg: Any) -> None:
        """Called with the whole run config before the data and the model load: refuse settings of
        the other groups (trainer, optimizer, model) the method cannot work with, naming the key.
        The default checks the strategy and, for :attr:`masks_gradients`, the weight decay."""
        self.check_strategy(cfg.trainer.get("strategy", "auto"), cfg.trainer.get("devices", 1))
        self.row_shards = self.check_strategy_family(cfg) == "fsdp"
        if self.masks_gradients:
            refuse_weight_decay(self.name, cfg.optimizer.get("weight_decay", 0) or 0)
        if (cfg.model.get("lora") or {}).get("enabled", False) and not self.trains_lora:
            raise ConfigError(
                f"method {self.name} does not train LoRA adapters (model.lora.enabled=true): {self.lora_refusal}"
            )

    @staticmethod
    def check_strategy_family(cfg: Any) -> str:
        """The strategy family of a run config (single_device, ddp, fsdp, deepspeed)."""
        return strategy_family(cfg.trainer.get("strategy", "auto"), cfg.trainer.get("devices", 1))

    def check_strategy(self, strategy: Any, devices: Any) -> None:
        family = strategy_family(strategy, devices)
        if family not in self.supported_strategies:
            hint = "; for FSDP use trainer=fsdp (FSDP2, fully_shard)" if family == "fsdp1" else ""
            raise ConfigError(
                f"method {self.name} supports trainer strategies {list(self.supported_strategies)}; "
                f"trainer.strategy is {family}, which is not one of them{hint}"
            )

    def on_stream_start(self, module: TrainingModule, stream: TaskStream) -> None:
        """Called once before the first evaluation: check settings against the model here."""

    def on_task_start(self, module: TrainingModule, task: Task, task_index: int) -> None:
        """Called before training on ``task``."""

    def training_examples(self, task: Task, task_index: int) -> list[Example]:
        """The examples the task is trained on: its training split; a replay method adds
        remembered ones (called after :meth:`on_task_start`)."""
        return list(task.train)

    def replayed_per_batch(self, task: Task, task_index: int) -> int | None:
        """How many examples of every global batch come from past ``task.train`` in
        :meth:`training_examples` (the rest are the task's own); None: all are shuffled together."""
        return None

    def after_task_epoch(self, task: Task, task_index: int) -> list[Example]:
        """Examples of one more epoch trained after the task's fit and :meth:`on_task_end`, before
        the task is evaluated, with the run's optimizer (TRACE's replay epoch); [] for none."""
        return []

    def penalty(
        self, module: TrainingModule, batch: dict[str, torch.Tensor], task_loss: torch.Tensor
    ) -> torch.Tensor | None:
        """A term added to the task loss of every training step, or None."""
        return None

    def training_loss(
        self, module: TrainingModule, batch: dict[str, torch.Tensor], task_loss: torch.Tensor
    ) -> torch.Tensor:
        """The loss of a training micro-batch, from its task loss (the token mean of the answer's
        cross-entropy): the task loss plus :meth:`penalty`; a method whose objective replaces the
        task loss (GeRe's (CE_general + CE_task) / 2 + w TM) returns its own."""
        penalty = self.penalty(module, batch, task_loss)
        return task_loss if penalty is None else task_loss + penalty

    def edit_gradients(self, module: TrainingModule, views: ParameterViews) -> None:
        """Once per optimizer step, after the micro-batches' gradients are accumulated and reduced
        over processes (DDP's mean, FSDP's reduce-scatter), before clipping and the optimizer: edit
        gradients in place. ``views`` hands out each parameter's weights and gradient as this
        process holds them (whole, or this process's rows under FSDP), and per-entry state placed
        with :func:`~cl_bench.training.parameter_views.place_state` matches them; so the edit is
        written once for every strategy (cl_bench/training/parameter_views.py)."""

    def on_task_end(self, module: TrainingModule, task: Task, task_index: int) -> None:
        """Called after training on ``task``, before it is evaluated."""

    def merge(self, module: TrainingModule, task: Task, task_index: int) -> None:
        """A merging method (:attr:`merges`), after ``task`` trained and after :meth:`on_task_end` and
        :meth:`after_task_epoch`: write into ``module.model`` the weights that are evaluated after the
        task and carried into the next one (through ``ParameterViews``: this process's rows under FSDP)."""

    def start_weights(self, module: TrainingModule, task: Task, task_index: int) -> None:
        """A merging method whose :attr:`starts_from` is not "merged", before task ``task_index``
        (> 0) starts (before :meth:`on_task_start`): write the weights it fine-tunes from."""

    def planned_state(self, model: torch.nn.Module, world: int, tasks: int) -> dict[str, int]:
        """Bytes per process of the method's own state, by what it is, for ``runners.plan``: ``model``
        is on the meta device (shapes, dtypes and ``requires_grad`` only), ``world`` processes share
        the run, ``tasks`` tasks are trained."""
        return {}

    def planned_pass(self, model: torch.nn.Module, world: int) -> dict[str, int]:
        """Bytes per process held only during the method's own pass at a task's start or end (a
        Fisher, scores, an attribution), for ``runners.plan``, which adds them to the peak with the
        activations (the pass holds its batch's). Under FSDP (:attr:`row_shards`) a pass holds
        this process's rows if it runs through the sharded model, the whole model if it gathers it."""
        return {}

    def report(self) -> dict[str, Any]:
        """What results.json's ``method`` section says of the run so far (e.g. how many samples
        formed each task's state), after every task; JSON values only."""
        return {}

    def planned_host(self, model: torch.nn.Module, world: int, tasks: int) -> dict[str, int]:
        """Bytes per process the method keeps in host memory, not on the GPU (for ``runners.plan``,
        which lists them apart from the GPU's peak)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What the method must keep across a resume (Fisher, anchors, masks, ...)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
