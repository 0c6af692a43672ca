"""The run's processes as a method or a learning paradigm sees them: the one door to them.

Plugins (methods/) and paradigms (cl_bench/on_policy/) never import a rank, shard or process-group
helper (tests/test_layout.py checks it). What they need of the other processes is a call here, on
``module.processes``, or on the views the module hands them (cl_bench/training/parameter_views.py:
a parameter's rows, gathered per-entry state, a sum over shards):

    module.processes.world_size         how many processes share each global batch (1 alone)
    module.processes.rank, .is_main     this process's place (0 alone), and whether it is the first
    module.processes.sum(t)             t added over the processes (a new tensor; t itself alone)
    module.processes.average(ts)        each tensor of ts averaged over the processes, in place
    module.full_weights()               every parameter whole on every process inside the block

Every call that talks to the other processes is a collective: every process makes it, in the same
order (they run the stream in lockstep).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from cl_bench.distributed import average_across_ranks, rank, sum_across_ranks, world_size


class Processes:
    """The processes of the run (one, or DDP's / FSDP's group), read when asked: Lightning opens the
    group after the module exists."""

    @property
    def world_size(self) -> int:
        return world_size()

    @property
    def rank(self) -> int:
        return rank()

    @property
    def is_main(self) -> bool:
        return rank() == 0

    @staticmethod
    def sum(tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` added over the processes (a new tensor; ``tensor`` itself in one process)."""
        return sum_across_ranks(tensor)

    @staticmethod
    def average(tensors: Iterable[torch.Tensor]) -> None:
        """Each of ``tensors`` averaged over the processes in place (nothing in one process)."""
        average_across_ranks(tensors)
