"""Global batches laid out over processes and micro-batches, resumable mid-epoch.

An optimizer step consumes one *global* batch of ``batch_size`` examples, whatever the number of
processes W and micro-batches A per process: per epoch, the examples are permuted (from the seed
and the epoch), global batch s is ``perm[s*G:(s+1)*G]``, process r takes its contiguous share
``[r*G/W, (r+1)*G/W)`` and cuts it into A micro-batches. Every micro-batch carries the loss
normaliser of its step, N_step / (W * A), where N_step is the number of labelled tokens in the
whole global batch: Lightning divides each micro-batch loss by A and DDP averages over W, so the
gradient is exactly the token mean over the global batch, the same for any W and A (up to float
summation order). With W = A = 1 this is the ordinary per-batch token mean.

The loader is stateful in Lightning's sense (``state_dict``/``load_state_dict``): a checkpoint
taken mid-epoch records the epoch and the micro-batches handed out, and a restored loader skips
those (without touching their data) and goes on with the same permutation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from cl_bench.errors import ConfigError, check_number
from cl_bench.rng import derive_seed


class StepIndex(NamedTuple):
    """An example index plus the loss normaliser of the optimizer step it belongs to."""

    index: int
    loss_normalizer: float


def layout(batch_size: int, micro_batch_size: int | None, world_size: int) -> tuple[int, int, int]:
    """(per-process batch, micro-batch, accumulation steps) for a global ``batch_size``."""
    check_number(batch_size, "train.batch_size", integer=True, low=1)
    if batch_size % world_size:
        raise ConfigError(
            f"train.batch_size ({batch_size}) is the global batch and must be divisible by the number of "
            f"processes ({world_size} = trainer.devices x trainer.num_nodes)"
        )
    per_process = batch_size // world_size
    micro = per_process if micro_batch_size is None else micro_batch_size
    if micro < 1 or per_process % micro:
        raise ConfigError(
            f"train.micro_batch_size ({micro_batch_size}) must divide the per-process batch "
            f"({per_process} = train.batch_size {batch_size} / {world_size} processes)"
        )
    return per_process, micro, per_process // micro


def steps_per_epoch(examples: int, batch_size: int, drop_last: bool, world_size: int = 1) -> int:
    """Optimizer steps of one epoch over ``examples`` (as :class:`StepBatchSampler` lays them out:
    the last, smaller batch is dropped with ``drop_last``, or when it has fewer examples than processes)."""
    full, rest = divmod(examples, batch_size)
    return full + (0 < rest and not drop_last and rest >= world_size)


def task_steps(examples: int, task: Any, train: Any, world_size: int = 1, repeat: int = 1) -> int:
    """Optimizer steps of ``task`` over ``examples`` under the run's ``train`` settings: its epochs
    (each global batch trained ``repeat`` steps), capped at its ``max_steps`` when set."""
    steps = (
        task.epochs * repeat * steps_per_epoch(examples, train.batch_size, train.get("drop_last", False), world_size)
    )
    return min(steps, task.max_steps) if task.max_steps else steps


def check_every_task_trains(tasks: Sequence, train: Any, world_size: int = 1) -> None:
    """Refuse, before anything loads, a run in which some task would take no optimizer step (it would
    end "finished" with nothing learnt, its BWT reading as perfect retention), or that has no task.
    ``train``: the run's ``train`` settings (``batch_size``, ``drop_last``), checked already."""
    batch_size, drop_last = train.batch_size, train.get("drop_last", False)
    if not tasks:
        raise ConfigError("the stream has no task to train (tasks.order, tasks.subset or the data dir selects none)")
    for task in tasks:
        if steps_per_epoch(len(task.train), batch_size, drop_last, world_size) == 0:
            raise ConfigError(
                f"task {task.name}: its {len(task.train)} training examples give no optimizer step at "
                f"train.batch_size={batch_size} with train.drop_last={drop_last}: lower "
                "train.batch_size or set train.drop_last=false"
            )


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this process's micro-batches of :class:`StepIndex`, step by step (see module doc)."""

    def __init__(
        self,
        label_tokens: Sequence[int],
        batch_size: int,
        micro_batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        fixed_share: tuple[int, int] | None = None,
        repeat: int = 1,
    ):
        """``fixed_share=(own, r)``: the first ``own`` examples are the task's, the rest a pool of
        which every global batch takes exactly ``r`` (see :meth:`_steps`); ``repeat``: every global
        batch's micro-batches are handed out that many times in a row (one optimizer step each)."""
        self.repeat = repeat
        self.per_process, self.micro, self.accumulate = layout(batch_size, micro_batch_size, world_size)
        if fixed_share is not None and not (0 < fixed_share[1] < batch_size and 0 < fixed_share[0] < len(label_tokens)):
            raise ConfigError(
                f"a fixed share of {fixed_share[1]} pooled examples per batch of {batch_size} needs "
                f"0 < share < batch and a non-empty pool ({len(label_tokens) - fixed_share[0]} pooled)"
            )
        self.fixed_share = fixed_share
        self.label_tokens = torch.as_tensor(list(label_tokens), dtype=torch.long)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.consumed = 0  # micro-batches handed out in the current epoch
        self._skip = 0
        # Lightning calls set_epoch on ``loader.batch_sampler.sampler`` at every epoch start.
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _steps(self) -> list[torch.Tensor]:
        if self.fixed_share is not None:
            return self._shared_steps(*self.fixed_share)
        n = len(self.label_tokens)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(self.seed, self.epoch)))
        else:
            order = torch.arange(n)
        full = n // self.batch_size
        steps = [order[s * self.batch_size : (s + 1) * self.batch_size] for s in range(full)]
        rest = order[full * self.batch_size :]
        if not self.drop_last and len(rest) >= self.world_size:  # (< world_size examples cannot be shared)
            steps.append(rest)
        return steps

    def _shared_steps(self, own: int, share: int) -> list[torch.Tensor]:
        """Every global batch: ``batch_size - share`` of the task's own examples (each once per
        epoch, in the epoch's order) and ``share`` from the pool, which is read in a fresh seeded
        order each time it is used up, its position carried across epochs."""
        take = self.batch_size - share
        order = torch.arange(own)
        if self.shuffle:
            order = torch.randperm(own, generator=torch.Generator().manual_seed(derive_seed(self.seed, self.epoch)))
        chunks = [order[s : s + take] for s in range(0, own, take)]
        if self.drop_last and len(chunks[-1]) < take:
            chunks.pop()
        pool = len(self.label_tokens) - own
        cursor = self.epoch * len(chunks) * share

        def pooled(k: int) -> int:
            cycle = torch.randperm(
                pool, generator=torch.Generator().manual_seed(derive_seed(self.seed, 1_000_000 + k // pool))
            )
            return own + int(cycle[k % pool])

        steps = []
        for chunk in chunks:
            steps.append(torch.cat([chunk, torch.tensor([pooled(cursor + j) for j in range(share)])]))
            cursor += share
        return steps

    def _split(self, step: torch.Tensor) -> list[torch.Tensor]:
        """This process's micro-batches of one global batch.

        A full batch: its contiguous share, in micro-batches of ``micro``. The smaller last batch of
        an epoch: with one process, micro-batches of ``micro`` as usual; with several, near-equal
        shares cut into the same number of micro-batches on every process (DDP needs equal counts),
        which may hold one example more than ``micro`` when the shares differ.
        """
        if len(step) == self.batch_size:
            mine = step[self.rank * self.per_process : (self.rank + 1) * self.per_process]
            return list(mine.split(self.micro))
        if self.world_size == 1:
            return list(step.split(self.micro))
        shares = torch.tensor_split(step, self.world_size)
        parts = min(-(-len(shares[0]) // self.micro), len(shares[-1]))
        return list(torch.tensor_split(shares[self.rank], parts))

    def _micro_batches(self) -> list[list[StepIndex]]:
        out = []
        for step in self._steps():
            normalizer = max(int(self.label_tokens[step].sum()), 1) / (self.world_size * self.accumulate)
            parts = [[StepIndex(int(i), normalizer) for i in part] for part in self._split(step)]
            out.extend(parts * self.repeat)
        return out

    def __iter__(self):
        batches = self._micro_batches()
        skip, self._skip = self._skip, 0
        self.consumed = skip
        for batch in batches[skip:]:
            self.consumed += 1
            yield batch

    def __len__(self) -> int:
        return self.repeat * sum(len(self._split(step)) for step in self._steps())

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self._skip = int(state["epoch"]), int(state["consumed"])


class ResumableLoader(torch.utils.data.DataLoader):
    """A DataLoader over a :class:`StepBatchSampler` whose position Lightning checkpoints."""

    def state_dict(self) -> dict[str, Any]:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_sampler.load_state_dict(state)
