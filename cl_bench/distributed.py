"""The run's processes: started once, at the start of a run, by Lightning's own launcher.

With ``trainer.strategy=ddp`` (or fsdp, deepspeed) and ``trainer.devices=N``, the first process
starts the other N-1 with Lightning's launcher before anything is loaded (under Hydra it re-runs
the same command in the same run dir; under torchrun or SLURM the processes already exist), and
opens the process group. Every process then runs the same stream in lockstep: each one trains on
its share of every global batch, generates answers for its share of the evaluation examples
(gathered in example order), and computes the same scores; rank 0 alone writes results,
checkpoints and logs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from cl_bench.errors import ConfigError

log = logging.getLogger(__name__)


def strategy_family(strategy: Any, devices: Any) -> str:
    """The family of a Lightning ``trainer.strategy`` setting: a name, a config node with a
    ``_target_`` (e.g. DDPStrategy), or an instance ("auto" is DDP on several devices)."""
    if isinstance(strategy, str):
        name = strategy
    elif hasattr(strategy, "get") and strategy.get("_target_"):
        name = str(strategy.get("_target_")).rsplit(".", 1)[-1]
    else:
        name = type(strategy).__name__
    name = name.lower()
    if "modelparallel" in name:  # Lightning's FSDP2 strategy (conf/trainer/fsdp.yaml)
        return "fsdp"
    if "fsdp" in name:  # Lightning's FSDPStrategy: FSDP1's flat parameters, which nothing here supports
        return "fsdp1"
    for family in ("deepspeed", "ddp"):
        if family in name:
            return family
    if name in ("auto", "single_device", "singledevicestrategy") and devices in (1, "1", None):
        return "single_device"
    return "ddp"


def start_processes(trainer) -> None:
    """Start the other processes of ``trainer``'s strategy and open its process group (no-op for one)."""
    strategy = trainer.strategy
    launcher = strategy.launcher
    # FSDP2's strategy has no launcher in the processes it started (or that a cluster started)
    model_parallel = type(strategy).__name__ == "ModelParallelStrategy"
    if trainer.world_size == 1 or (launcher is None and not model_parallel):
        return
    if launcher is not None and not isinstance(launcher, _SubprocessScriptLauncher):
        raise ConfigError(
            f"trainer.strategy={type(strategy).__name__} starts its processes with {type(launcher).__name__}; "
            "the runner needs whole-script processes: use ddp, fsdp or deepspeed (not *_spawn or *_notebook)"
        )
    if launcher is not None:
        launcher.launch(lambda: None)
    if model_parallel:
        # its setup_environment also hands a device mesh to the LightningModule, which only each
        # task's fit has: here only the device and the process group
        strategy.accelerator.setup_device(strategy.root_device)
        strategy._setup_distributed()
    else:
        strategy.setup_environment()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(items: Sequence[Any]) -> list[Any]:
    """This process's share of ``items``: every world_size-th one, starting at its rank."""
    return list(items[rank() :: world_size()])


def gather_shards(local: list[Any], total: int) -> list[Any]:
    """The inverse of :func:`shard`: every process's share, back in the original order."""
    if not is_distributed():
        return local
    parts: list[list[Any]] = [[] for _ in range(world_size())]
    dist.all_gather_object(parts, local)
    out: list[Any] = [None] * total
    for r, part in enumerate(parts):
        out[r :: world_size()] = part
    return out


def average_across_ranks(tensors: Iterable[torch.Tensor]) -> None:
    """In-place mean over the processes (no-op in one process)."""
    if is_distributed():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(world_size())


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the processes (a new tensor; itself in one process)."""
    if not is_distributed():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def in_multirun() -> bool:
    """This run is a job of a Hydra multirun (a sweep)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def parallel_jobs() -> int:
    """How many jobs of a local sweep run at once on this machine (hydra/launcher=local_parallel's
    n_jobs; joblib's -1 is every core), 1 otherwise."""
    if not in_multirun():
        return 1
    launcher = HydraConfig.get().launcher
    if not str(launcher.get("_target_", "")).endswith("JoblibLauncher"):
        return 1
    n = int(launcher.get("n_jobs") or 1)
    return n if n > 0 else max(1, cores() + 1 + n)


def cores() -> int:
    """The cores this process may run on (its CPU affinity: taskset, a SLURM allocation, a cgroup)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def share_threads(processes: int) -> str | None:
    """Give this process its share of the cores when ``processes`` torch processes run on this
    machine at once (a run's DDP processes, a local sweep's parallel jobs): each would otherwise
    start a thread per core, and threads that outnumber the cores wait on each other (20x slower
    seen at 2 processes on 2 cores). OMP_NUM_THREADS set by the user (torchrun sets 1) is left as it
    is. Returns what was decided (logged by the main process); None when nothing was changed."""
    if processes <= 1 or os.environ.get("OMP_NUM_THREADS"):
        return None
    threads = max(1, min(torch.get_num_threads(), cores()) // processes)
    torch.set_num_threads(threads)
    decided = (
        f"torch threads: {threads} per process ({processes} processes at once on {cores()} cores; "
        "OMP_NUM_THREADS overrides)"
    )
    if is_main():
        log.info(decided)
    return decided
