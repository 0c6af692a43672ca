"""Lightning Trainers built from ``conf/trainer``: one per task, and one that only places the run.

Every task gets a fresh Trainer (so a fresh optimizer; see cl_bench/training/method.py); its epochs and step
cap come from the task, its gradient accumulation from the global batch layout
(cl_bench/data/batching.py). Before anything is loaded, :func:`placement_trainer` builds a Trainer
that trains nothing: it tells the device and the number of processes, and its strategy starts the
processes (cl_bench/distributed.py).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable

import torch
from lightning import Trainer
from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator
from lightning.pytorch.callbacks import Callback, RichProgressBar
from omegaconf import DictConfig

from cl_bench.config import build
from cl_bench.errors import ConfigError

log = logging.getLogger(__name__)
# Lightning's own use of a deprecated torch API, warned at every fit; nothing a user can change.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# Lightning's per-fit banners ("GPU available", tips) would repeat once per task.
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def check_accelerator(trainer: DictConfig) -> None:
    """Refuse a GPU trainer on a machine without one, saying which settings run it on the CPU."""
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda", "mps") and not (CUDAAccelerator.is_available() or MPSAccelerator.is_available()):
        raise ConfigError(
            f"trainer.accelerator={accelerator} but this machine has no GPU; to run these settings on the CPU "
            "add trainer.accelerator=cpu trainer.precision=32-true (e.g. DDP over 2 CPU processes: trainer=ddp "
            "trainer.accelerator=cpu trainer.devices=2 trainer.precision=32-true)"
        )


def check_precision(cfg: DictConfig) -> None:
    """Refuse fp16 mixed precision with a fused optimizer and gradient clipping: the fused step
    unscales the gradients itself, so clipping would see them scaled (Lightning stops at the first
    step; here the run stops before anything loads)."""
    precision = str(cfg.trainer.get("precision", "32-true"))
    if (
        precision.startswith("16")
        and cfg.get("optimizer", {}).get("fused", False)
        and cfg.trainer.get("gradient_clip_val")
    ):
        raise ConfigError(
            f"trainer.precision={precision} with optimizer.fused=true cannot clip gradients "
            f"(trainer.gradient_clip_val={cfg.trainer.gradient_clip_val}): the fused step unscales them itself; "
            "use trainer.precision=bf16-mixed, optimizer.fused=false or trainer.gradient_clip_val=null"
        )


#: weights in these dtypes lose small optimizer updates to rounding (bf16 keeps 8 significant bits)
LOW_PRECISION = (torch.bfloat16, torch.float16)


def warn_low_precision_weights(model: torch.nn.Module) -> bool:
    """Say at start when the trained weights themselves are bf16/fp16 (no fp32 master copy)."""
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    low = sorted(str(d).removeprefix("torch.") for d in dtypes if d in LOW_PRECISION)
    if low:
        log.warning(
            "the trained weights are %s: AdamW updates them in place, and an update smaller than the "
            "weight's rounding step (1/256 of its size in bf16) is lost, e.g. most updates at lr 1e-5. "
            "For fp32 master weights keep model.dtype=float32 with trainer.precision=bf16-mixed",
            "/".join(low),
        )
    return bool(low)


class TaskProgressBar(RichProgressBar):
    """Rich's bar, its total the batches this epoch will train: under tasks.max_steps, Lightning's
    counts the epoch's batches whenever max_epochs is set (4 steps of 16 batches showed 4/16)."""

    @property
    def total_train_batches(self) -> int | float:
        total, trainer = super().total_train_batches, self.trainer
        if trainer.max_steps is None or trainer.max_steps < 0:
            return total
        return min(total, max(trainer.max_steps - trainer.global_step, 0) * trainer.accumulate_grad_batches)


def build_trainer(
    cfg: DictConfig,
    epochs: int | None = None,
    max_steps: int | None = None,
    callbacks: Iterable[Callback] = (),
    accumulate: int = 1,
) -> Trainer:
    """A Trainer for one task of ``epochs`` epochs (and at most ``max_steps`` optimizer steps).

    ``epochs=None``: a Trainer that trains nothing (no budget, no progress bar).
    """
    if "accumulate_grad_batches" in cfg.trainer:
        raise ConfigError(
            "trainer.accumulate_grad_batches is derived from train.batch_size (the global batch) "
            "and train.micro_batch_size; set those instead"
        )
    check_accelerator(cfg.trainer)
    check_precision(cfg)
    callbacks = list(callbacks)
    budget = {}
    if epochs is not None:
        budget = {"max_epochs": epochs, "max_steps": max_steps or -1}
        if cfg.trainer.get("enable_progress_bar", True):
            callbacks.append(TaskProgressBar(leave=True))
    return build(fsdp_mesh(cfg.trainer), callbacks=callbacks, accumulate_grad_batches=accumulate, **budget)


def fsdp_mesh(trainer: DictConfig) -> DictConfig:
    """``trainer=fsdp``'s ``data_parallel_size: auto`` made every process (Lightning's own "auto"
    is the node count, meant for tensor parallelism within a node)."""
    strategy = trainer.get("strategy")
    if not (
        hasattr(strategy, "get")
        and str(strategy.get("_target_", "")).endswith("ModelParallelStrategy")
        and strategy.get("data_parallel_size", "auto") == "auto"
    ):
        return trainer
    trainer = trainer.copy()
    trainer.strategy.data_parallel_size = int(trainer.get("devices", 1)) * int(trainer.get("num_nodes", 1))
    return trainer


def placement_trainer(cfg: DictConfig, multirun: bool = False) -> Trainer:
    """A Trainer that trains nothing: its device, its process count and the launcher of its strategy.
    ``multirun``: the run is a job of a local sweep, which cannot start DDP processes."""
    placement = build_trainer(cfg)
    if (
        multirun
        and placement.world_size > 1
        and not placement.strategy.cluster_environment.creates_processes_externally
    ):
        raise ConfigError(
            "a local multirun cannot start DDP processes (Lightning re-runs the command line, sweep "
            "and all, in each); sweep with hydra/launcher=slurm, which starts every run's processes"
        )
    return placement
