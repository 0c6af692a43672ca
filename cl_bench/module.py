"""The LightningModule that trains a causal LM on one task at a time."""
from __future__ import annotations

import math
from typing import Callable

import torch
from lightning.pytorch import LightningModule

from cl_bench.checkpointing import rng_state, set_rng_state
from cl_bench.lm import causal_lm_loss
from methods.base import CLMethod


def constant_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int = 0):
    """TRACE's schedule: linear warm-up over ``warmup_steps`` optimizer steps, then constant."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup_steps + 1)))


class CLModule(LightningModule):
    """Wraps the model; the loss is the task loss plus the method's penalty.

    ``optimizer`` and ``scheduler`` are factories (Hydra partials); both are called at every
    ``trainer.fit``, i.e. once per task. ``log_every_n_steps`` also decides how often the loss is
    checked for NaN and how often methods log their telemetry (``should_log``). Training metrics go to ``metric_sink`` with a step counter
    that runs on across tasks (``step_offset`` + the task's global step), so loggers see one
    monotonic curve for the whole stream.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        method: CLMethod,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        metric_sink: Callable[[dict[str, float], int], None] | None = None,
        log_every_n_steps: int = 10,
        loader_factory: Callable[..., torch.utils.data.DataLoader] | None = None,
    ):
        super().__init__()
        self.model = model
        self.method = method
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.metric_sink = metric_sink
        self.log_every_n_steps = log_every_n_steps
        #: ``loader_factory(examples, shuffle=False, seed=0)``: batches tokenized as for training
        #: (methods use it for passes over a task's data, e.g. a Fisher estimate).
        self.loader_factory = loader_factory
        self.task_name = ""
        self.step_offset = 0

    @property
    def should_log(self) -> bool:
        """True on the steps where training metrics are logged."""
        return self.global_step % self.log_every_n_steps == 0

    @property
    def stream_step(self) -> int:
        """Optimizer steps taken over the whole stream so far."""
        return self.step_offset + self.global_step

    def on_fit_start(self) -> None:
        # HF models load in eval mode and Lightning keeps the mode it finds: train with dropout on.
        self.model.train()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        task_loss = causal_lm_loss(self.model, batch)
        penalty = self.method.penalty(self, batch, task_loss)
        loss = task_loss if penalty is None else task_loss + penalty
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        if self.should_log:
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"non-finite training loss ({value}) on task '{self.task_name}' at step {self.global_step}"
                )
            self.log_metrics({"train/loss": value, "train/task_loss": task_loss.item()})
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Mid-task checkpoints also carry the RNG states, so a resumed task draws what it would have."""
        checkpoint["rng"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        set_rng_state(checkpoint["rng"])

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Send metrics to the run's loggers at the current stream step (methods use this too)."""
        if self.metric_sink is not None:
            self.metric_sink(metrics, self.stream_step)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
