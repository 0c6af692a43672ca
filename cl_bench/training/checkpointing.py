"""Checkpoints of a stream, for exact resume after a crash or preemption.

Two kinds, both under ``<run dir>/checkpoints/``:

* ``stage-NNN.pt``: written after the base evaluation (NNN = 0) and after every task (NNN = tasks
  done): model weights (none for stage 0: they are the configured initial model), the method's
  state (Fisher, anchors, ...), the score matrix and timings so far, the stream step counter, the
  RNG states, the loggers' run ids and the config it was taken under. The newest ``keep_stages``
  are kept.
* ``task-NNN-step-SSSSSSS.ckpt``: Lightning checkpoints every ``every_n_steps`` optimizer steps
  within task NNN: weights, optimizer, scheduler, loop counters, the method's mid-task state (a
  Lightning callback's state), the data loader's position and the RNG states (CLModule adds them).
  The newest ``keep_steps`` of the current task are kept; a finished task's are deleted.

Files appear by atomic rename, so a killed process leaves either the old or the new file. Loading
uses ``torch.load(weights_only=True)``; an unreadable file is reported by name and the previous
good one is used instead.
"""

from __future__ import annotations

import logging
import math
import re
import shlex
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from cl_bench.config import current_settings, flat_settings
from cl_bench.distributed import is_main
from cl_bench.errors import ConfigError
from cl_bench.files import atomic_write
from cl_bench.models import is_adapter
from cl_bench.training.sharding import full_state_dict

log = logging.getLogger(__name__)
CHECKPOINT_DIR = "checkpoints"
_STAGE = re.compile(r"^stage-(\d+)\.pt$")
_STEP = re.compile(r"^task-(\d+)-step-(\d+)\.ckpt$")
#: config keys a resume may change: where files go, how it is logged and checkpointed
RESUMABLE_CHANGES = (
    "paths",
    "resume",
    "logger",
    "checkpoint",
    "trainer.enable_progress_bar",
    "hydra",
    "dry_run",
    "heartbeat_s",
    "tasks.protocol",  # the published counts runners.data check compares with: not read by a run
)


def load_file(path: Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's contents; ``ValueError`` naming the file when it cannot be read.

    ``mmap=True`` maps the tensors instead of reading them: enough to check a file is whole.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated, corrupt, or not a checkpoint: one message that names the file
        reason = (str(e).strip().splitlines() or [""])[0][:200]  # torch's messages run to paragraphs
        raise ValueError(f"checkpoint {path} is unreadable ({type(e).__name__}: {reason})") from e


class StreamCheckpoints:
    """Writes, prunes and finds the checkpoints of one run dir (writes on rank 0 only)."""

    def __init__(
        self, run_dir: str | Path, every_n_steps: int | None = None, keep_steps: int = 1, keep_stages: int | None = 1
    ):
        self.dir = Path(run_dir) / CHECKPOINT_DIR
        self.every_n_steps, self.keep_steps, self.keep_stages = every_n_steps, keep_steps, keep_stages

    def files(self, pattern: re.Pattern, task_index: int | None = None) -> list[tuple[tuple[int, ...], Path]]:
        """Matching files, oldest first."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = pattern.match(p.name)
            if m and (task_index is None or int(m.group(1)) == task_index):
                found.append((tuple(int(g) for g in m.groups()), p))
        return sorted(found)

    @staticmethod
    def _prune(files: list[tuple[tuple[int, ...], Path]], keep: int | None) -> None:
        """Delete all but the newest ``keep`` of ``files`` (oldest first; None keeps all)."""
        if keep is not None:
            for _, p in files[: max(len(files) - keep, 0)]:
                p.unlink()

    def save_stage(self, state: dict[str, Any], tasks_done: int) -> None:
        """The stream state after ``tasks_done`` tasks; then prune old stages and the task's step files."""
        if not is_main():
            return
        atomic_write(self.dir / f"stage-{tasks_done:03d}.pt", lambda tmp: torch.save(state, tmp))
        stages = self.files(_STAGE)
        for (done,), p in stages:  # stages past this one are from a past the run could not restore
            if done > tasks_done:
                p.unlink()
        self._prune([(k, p) for k, p in stages if k[0] <= tasks_done], self.keep_stages)
        for (task, _), p in self.files(_STEP):
            if task < tasks_done:
                p.unlink()

    def save_step(self, trainer, task_index: int) -> None:
        """A Lightning checkpoint at the trainer's step (every rank takes part); keep the newest."""
        path = self.dir / f"task-{task_index:03d}-step-{trainer.global_step:07d}.ckpt"
        if not is_main():  # a collective call: Lightning writes on rank 0 alone
            trainer.save_checkpoint(path, weights_only=False)
            return
        atomic_write(path, lambda tmp: trainer.save_checkpoint(tmp, weights_only=False))  # all of it, said so
        self._prune(self.files(_STEP, task_index), self.keep_steps)

    def latest_stage(self) -> dict[str, Any] | None:
        """The newest readable stage checkpoint (falling back past unreadable ones), or None if there
        is none at all. Stage files of which none is readable are refused: starting over would
        overwrite the results they recorded."""
        stages = self.files(_STAGE)
        for _, path in reversed(stages):
            try:
                return load_file(path)
            except ValueError as e:
                log.warning("%s; falling back to the previous checkpoint", e)
        if stages:
            raise ConfigError(
                f"cannot resume {self.dir.parent}: no stage checkpoint is readable "
                f"({', '.join(p.name for _, p in stages)}); move {self.dir} away to start this run over"
            )
        return None

    def resume_point(self, resume_key: dict[str, Any]) -> tuple[dict[str, Any] | None, Path | None]:
        """Where a run in this dir continues: the newest readable stage (refused when its settings or
        data differ from ``resume_key``) and the newest step checkpoint of the task after it;
        (None, None) for a new run."""
        saved = self.latest_stage()
        if saved is None:
            return None, None
        self.check_resumable(saved, resume_key)
        return saved, self.latest_step(saved["tasks_done"])

    @staticmethod
    def step_of(path: Path | None) -> int:
        """The optimizer step (within its task) a step checkpoint was taken at; 0 for None."""
        return 0 if path is None else int(_STEP.match(path.name).group(2))

    def latest_step(self, task_index: int) -> Path | None:
        """The newest readable step checkpoint of ``task_index`` (falling back past unreadable ones)."""
        for _, path in reversed(self.files(_STEP, task_index)):
            try:
                load_file(path, mmap=True)
                return path
            except ValueError as e:
                log.warning("%s; falling back to the previous checkpoint", e)
        return None

    @staticmethod
    def comparable(config: dict[str, Any]) -> dict[str, Any]:
        """The settings that decide a run's results (what a resume must not change), flattened."""
        return current_settings(flat_settings(config, RESUMABLE_CHANGES))

    def check_resumable(self, saved: dict[str, Any], config: dict[str, Any]) -> None:
        """Refuse to resume from ``saved`` (a stage checkpoint) under settings that differ from its own."""
        before, after = current_settings(saved["config"]), self.comparable(config)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        if changed:  # every difference, none left out
            data = " (the stream's data files changed)" if "data_sha256" in changed else ""
            raise ConfigError(
                f"cannot resume {self.dir.parent}: these {len(changed)} settings differ from the run's "
                f"checkpoint{data}: " + ", ".join(f"{k} ({before.get(k)!r} -> {after.get(k)!r})" for k in changed)
            )

    def step_callback(self, task_index: int, before_save=None) -> StepCheckpoint | None:
        return StepCheckpoint(self, task_index, before_save) if self.every_n_steps else None


class StepCheckpoint(Callback):
    """Saves a Lightning checkpoint every ``every_n_steps`` optimizer steps of one task (at multiples of
    the learning paradigm's ``checkpoint_every`` too: GRPO's num_iterations); first calls
    ``before_save`` (the loggers' flush: a resume from the checkpoint keeps every row logged before it)."""

    def __init__(self, checkpoints: StreamCheckpoints, task_index: int, before_save=None):
        self.checkpoints, self.task_index, self.before_save = checkpoints, task_index, before_save
        self.last_saved = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # GRPO with num_iterations: only where no rollouts await reuse, so none need saving
        every = math.lcm(
            self.checkpoints.every_n_steps, getattr(getattr(pl_module, "learning", None), "checkpoint_every", 1)
        )
        if step == 0 or step % every or step == self.last_saved:
            return
        pl_module.check_weights_finite()  # a diverged step must not replace the last good checkpoint
        self.last_saved = step
        if self.before_save is not None:
            self.before_save()
        self.checkpoints.save_step(trainer, self.task_index)


def run_dir(cfg, out_dir: str | Path) -> Path:
    """``out_dir``, or the run dir named by ``resume`` (which must hold a run to resume); the
    loggers then write into that run's own dir too (``paths.output_dir`` is set to it)."""
    if not cfg.get("resume"):
        return Path(out_dir)
    resume = Path(cfg.resume)
    if not (resume / CHECKPOINT_DIR).is_dir():
        raise ConfigError(f"resume={resume}: no run to resume there ({resume / CHECKPOINT_DIR} does not exist)")
    OmegaConf.update(cfg, "paths.output_dir", str(resume))
    return resume


def resume_command(run_dir: str | Path) -> str:
    """The command that continues the run in ``run_dir`` (its recorded settings, its newest
    checkpoint): rerunning the first command would start a new run in a new dated dir."""
    return f"python -m runners.cl resume={shlex.quote(str(run_dir))}"


def stage_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a stage checkpoint keeps of the model: every weight, or with LoRA (peft) only the
    adapters; the base model stays as it was loaded. A sharded model (FSDP) is gathered whole on
    rank 0 (every process must call this)."""
    state = full_state_dict(model)
    return {k: v for k, v in state.items() if is_adapter(k)} if hasattr(model, "peft_config") else state


def restore_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load what :func:`stage_weights` kept: with LoRA, the weights left out must be exactly the
    base model's."""
    if not hasattr(model, "peft_config"):
        model.load_state_dict(state)
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    wrong = [k for k in missing if is_adapter(k)] + list(unexpected)
    if wrong:
        raise ConfigError(f"the checkpoint's weights do not fit the model (e.g. {wrong[0]}): was model.lora changed?")
