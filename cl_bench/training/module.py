"""The LightningModule that trains a causal LM on one task at a time."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.precision import MixedPrecision

from cl_bench.data.loaders import TaskLoaders
from cl_bench.errors import Diverged
from cl_bench.rng import rng_state, set_rng_state
from cl_bench.training.learning import SFT, Learning
from cl_bench.training.parameter_views import ParameterViews
from cl_bench.training.processes import Processes
from cl_bench.training.sharding import full_weights, local, shard_model

if TYPE_CHECKING:
    from cl_bench.data.tasks import Example
    from cl_bench.training.method import CLMethod


def autocast_of(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast Lightning's MixedPrecision puts around ``training_step`` under ``trainer.precision``
    bf16-mixed, else nothing: the methods' own passes run under it too, so their activations are
    the training step's. Under 16-mixed the passes stay in fp32: their backward passes have no
    loss scaler, and fp16 gradients of small entries would underflow."""
    if str(precision) != "bf16-mixed":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


class CLModule(LightningModule):
    """Wraps the model; the loss is the method's ``training_loss`` (the task loss, of ``learning``'s
    paradigm, plus the method's penalty).

    ``optimizer`` and ``scheduler`` are factories (Hydra partials); both are called at every
    ``trainer.fit``, i.e. once per task, unless ``reset_optimizer=False``: then they are called once,
    over every parameter of the model, and the same optimizer and scheduler (moments, step count)
    run the whole stream, as in TRACE; :meth:`optimizer_state` and :meth:`load_optimizer_state`
    carry them through stage checkpoints. ``log_every_n_steps`` also decides how often the loss is
    checked for NaN and how often methods log their telemetry (``should_log``). Training metrics
    go to ``metric_sink`` with a step counter that runs on across tasks (:attr:`stream_step`), so
    loggers see one monotonic curve for the whole stream.

    What the run does with it: :meth:`begin_task` before a task's fit, :meth:`end_fit` after it.
    What methods use (cl_bench/training/method.py's ``TrainingModule``): :meth:`pass_loader` (a
    task's examples, batched as for training), :attr:`processes`, :meth:`full_weights`,
    :meth:`precision_context`, :meth:`log_metrics`,
    :attr:`should_log`, :attr:`step_logits` and :attr:`step_sequence_logits` (in ``penalty``),
    ``model`` and ``task_name``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        method: CLMethod,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        metric_sink: Callable[[dict[str, float], int], None] | None = None,
        log_every_n_steps: int = 10,
        loaders: TaskLoaders | None = None,
        device: torch.device | str = "cpu",
        reset_optimizer: bool = True,
        precision: str = "32-true",
        learning: Learning | None = None,
    ):
        super().__init__()
        #: how a micro-batch becomes the task loss (``learning``: SFT unless GRPO or self-SFT)
        self.learning = learning if learning is not None else SFT()
        #: the run's ``trainer.precision``; :meth:`precision_context` applies it to the methods' passes
        self.precision = str(precision)
        self.model = model
        self.method = method
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.metric_sink = metric_sink
        self.log_every_n_steps = log_every_n_steps
        self.loaders = loaders
        #: where the model lives between fits (Lightning moves it to the CPU when a fit ends)
        self.home_device = torch.device(device)
        self.task_name = ""
        self.task_started, self.task_seconds_before = time.perf_counter(), 0.0
        #: optimizer steps of the tasks finished before the current one
        self.step_offset = 0
        self.reset_optimizer = reset_optimizer
        #: the stream's one optimizer and scheduler when they are not reset per task
        self.stream_optimizer: torch.optim.Optimizer | None = None
        self.stream_scheduler = None
        self._pending_optimizer_state: dict | None = None
        #: (logits, targets) of the current training micro-batch at its labelled positions
        #: (cl_bench.training.lm.labelled_logits), for a method's penalty (e.g. LwF's distillation)
        self.step_logits: tuple[torch.Tensor, torch.Tensor] | None = None
        self.step_losses: torch.Tensor | None = None  # (loss, task loss) of the step so far, summed over micro-batches
        #: every position's logits of the micro-batch [batch, length, V], for a method whose
        #: ``sequence_logits`` is True (computed in the same forward pass; None otherwise)
        self.step_sequence_logits: torch.Tensor | None = None
        #: this process's micro-batches per optimizer step and the current one's place among them
        self.micro_batches_per_step, self.micro_batch_in_step = 1, 0
        #: the run's processes (rank, world size, sums and averages over them) for methods and paradigms
        self.processes = Processes()
        #: times the weights were replaced outside training (a merging method's merge and start weights)
        self.weight_replacements = 0

    def begin_task(self, name: str) -> None:
        """The next fit trains task ``name`` (named in errors, e.g. a non-finite loss); its clock starts."""
        self.task_name = name
        self.task_started, self.task_seconds_before = time.perf_counter(), 0.0

    def task_seconds(self) -> float:
        """Seconds spent on the current task, those before a resume included (step checkpoints carry them)."""
        return self.task_seconds_before + time.perf_counter() - self.task_started

    @property
    def weights_version(self) -> object:
        """What names the current weights for an engine's ``sync``: the stream step, and how often
        they were replaced since (a merge after the task's last step changes them at the same step)."""
        return self.stream_step if not self.weight_replacements else (self.stream_step, self.weight_replacements)

    def merge_after_task(self, task, task_index: int) -> None:
        """A merging method's merge (``CLMethod.merge``) after task ``task_index``'s training and task
        end, at the run's precision (a merge may run a pass first: Fisher merging's Fisher)."""
        if self.method.merges:
            with self.precision_context():
                self.method.merge(self, task, task_index)
            self.weight_replacements += 1

    @torch.no_grad()
    def start_task_weights(self, task, task_index: int) -> None:
        """Before task ``task_index``'s ``on_task_start``: a merging method that does not train on from
        the merged weights (``CLMethod.starts_from``) writes the weights the task starts from."""
        if self.method.merges and task_index > 0 and self.method.starts_from != "merged":
            self.method.start_weights(self, task, task_index)
            self.weight_replacements += 1

    def resume_stream(self, step_offset: int) -> None:
        """Continue the stream's step axis of a resumed run after its ``step_offset`` finished steps."""
        self.step_offset = step_offset

    def end_fit(self) -> None:
        """After a task's fit: count its steps into the stream step, detach the finished Trainer
        (its global_step must not count twice) and put the model back on the run's device."""
        self.step_offset += self.trainer.global_step
        self.learning.end_fit(self)
        self.trainer = None
        self.to(self.home_device)

    def precision_context(self) -> contextlib.AbstractContextManager:
        """The training step's autocast, for a method's pass outside it (a Fisher, a reference
        gradient, a teacher's cache; see :func:`autocast_of`)."""
        return autocast_of(self.precision, next(self.model.parameters()).device)

    def full_weights(self) -> contextlib.AbstractContextManager:
        """Inside the block every parameter is whole on every process (FSDP gathers each unit; a
        no-op otherwise): for a method's pass that needs the whole model on every process (a
        teacher's logits, an attribution). Every process must enter it."""
        return full_weights(self.model)

    def pass_loader(self, examples: Sequence[Example]) -> torch.utils.data.DataLoader:
        """All of ``examples`` in order, in micro-batches tokenized as for training (for a method's
        pass over a task's data, e.g. a Fisher estimate)."""
        if self.loaders is None:
            raise RuntimeError("this CLModule was built without loaders (CLModule(..., loaders=TaskLoaders(...)))")
        return self.loaders.passes(examples)

    @property
    def should_log(self) -> bool:
        """True on the steps where training metrics are logged."""
        return self.global_step % self.log_every_n_steps == 0

    @property
    def stream_step(self) -> int:
        """Optimizer steps taken over the whole stream so far."""
        return self.step_offset + self.global_step

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` (Lightning's ModelParallelStrategy): shard the model over the
        data-parallel processes at the first fit (cl_bench/training/sharding.py)."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None:
            shard_model(self.model, mesh["data_parallel"])

    def on_fit_start(self) -> None:
        # HF models load in eval mode and Lightning keeps the mode it finds: train with dropout on.
        self.model.train()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.micro_batches_per_step = self.trainer.accumulate_grad_batches
        self.micro_batch_in_step = batch_idx % self.micro_batches_per_step  # every step but an epoch's last is whole
        task_loss = self.learning.task_loss(self, batch)  # SFT: sets step_logits (and step_sequence_logits)
        loss = self.method.training_loss(self, batch, task_loss)
        self.step_logits = self.step_sequence_logits = None  # the logits are not kept past the step
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        value = loss.item()  # checked at every step: a diverged task must never be recorded as a stage
        if not math.isfinite(value):
            raise Diverged(f"non-finite training loss ({value}) on task '{self.task_name}' at step {self.global_step}")
        # the step's losses: each micro-batch's share (Lightning divides by the accumulation count)
        losses = torch.stack([loss.detach(), task_loss.detach()]) / self.micro_batches_per_step
        self.step_losses = losses if self.micro_batch_in_step == 0 else self.step_losses + losses
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Once per optimizer step, after every micro-batch and the reduction over processes, before
        clipping: the learning paradigm's step telemetry, the method's gradient edit, then the step's
        loss, the token mean over the whole global batch (every process's, a partial last batch
        too), logged on logging steps."""
        self.learning.end_step(self)
        self.method.edit_gradients(self, ParameterViews(self.model))
        if self.should_log and self.step_losses is not None:
            loss, task_loss = self.trainer.strategy.reduce(self.step_losses, reduce_op="mean").tolist()
            self.log_metrics({"train/loss": loss, "train/task_loss": task_loss})
        self.step_losses = None

    def check_weights_finite(self) -> None:
        """Raise if any weight is NaN or infinite (an optimizer step can diverge after a finite loss)."""
        for name, p in self.model.named_parameters():
            if not torch.isfinite(local(p)).all():
                raise Diverged(f"non-finite weights in {name} on task '{self.task_name}' at step {self.global_step}")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Mid-task checkpoints also carry the RNG states, so a resumed task draws what it would have."""
        checkpoint["rng"] = rng_state()
        checkpoint["task_seconds"] = self.task_seconds()
        if learning := self.learning.state_dict():  # GRPO: its telemetry and the rollouts still to reuse
            checkpoint["learning"] = learning

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        set_rng_state(checkpoint["rng"])
        if "learning" in checkpoint:
            self.learning.load_state_dict(checkpoint["learning"])
        # the task's seconds up to the checkpoint stand in for this process's own before the fit
        self.task_seconds_before = checkpoint.get("task_seconds", 0.0) - (time.perf_counter() - self.task_started)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Send metrics to the run's loggers at the current stream step (methods use this too)."""
        if self.metric_sink is not None:
            self.metric_sink(metrics, self.stream_step)

    def configure_optimizers(self):
        if self.reset_optimizer:
            optimizer = self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])
            scheduler = None if self.scheduler_factory is None else self.scheduler_factory(optimizer)
        else:
            if self.stream_optimizer is None:
                # every parameter: a matrix frozen during the first task (HFT) must train in later ones
                self.stream_optimizer = self.optimizer_factory(list(self.model.parameters()))
                self.stream_scheduler = (
                    None if self.scheduler_factory is None else self.scheduler_factory(self.stream_optimizer)
                )
                if self._pending_optimizer_state is not None:
                    self.load_optimizer_state(self._pending_optimizer_state)
            optimizer, scheduler = self.stream_optimizer, self.stream_scheduler
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, except under bf16-mixed with a fused optimizer: Lightning refuses any
        fused optimizer under mixed precision, since under fp16 its step unscales the gradients
        itself, after clipping would have seen them scaled. bf16 has no loss scale, so the gradients
        are the true ones and are clipped as in fp32 (fp16 with a fused optimizer is refused at start)."""
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            params = list(plugin.main_params(optimizer))
            if str(gradient_clip_algorithm or "norm") == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_state(self) -> dict | None:
        """The stream optimizer's and scheduler's state (None when the optimizer is reset per task)."""
        if self.stream_optimizer is None:
            return self._pending_optimizer_state
        return {
            "optimizer": self.stream_optimizer.state_dict(),
            "scheduler": None if self.stream_scheduler is None else self.stream_scheduler.state_dict(),
        }

    def load_optimizer_state(self, state: dict | None) -> None:
        """Restore :meth:`optimizer_state` (now, or when the stream optimizer is created)."""
        if state is None or self.stream_optimizer is None:
            self._pending_optimizer_state = state
            return
        self.stream_optimizer.load_state_dict(state["optimizer"])
        if self.stream_scheduler is not None and state["scheduler"] is not None:
            self.stream_scheduler.load_state_dict(state["scheduler"])
        self._pending_optimizer_state = None
