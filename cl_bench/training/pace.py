"""A hint when training steps slow down: other processes competing for the cores.

Every torch process starts a thread per core. Several of them on one machine (a sweep's parallel
jobs, DDP on the CPU, someone else's job) oversubscribe the cores, and their threads then wait on
each other: at 2 processes on 2 cores a run went 20x slower. A run cannot see the other processes,
but it can see its own steps: :class:`StepPace` compares the time per token of recent training
batches with the run's own first ones and, once they are ``slower``-fold slower, logs how to give
each process its share of the cores. Per token, so that tasks of longer examples do not count as
a slow-down.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque

from lightning.pytorch.callbacks import Callback

from cl_bench.distributed import cores, is_main

log = logging.getLogger(__name__)


class StepPace(Callback):
    """Times every training batch per token; warns once per run when the median of the last
    ``window`` batches is ``slower`` times the median of the run's first ones (after ``warmup``)."""

    def __init__(self, slower: float = 4.0, warmup: int = 2, window: int = 10, clock=time.perf_counter):
        self.slower, self.warmup, self.window, self.clock = slower, warmup, window, clock
        self.first: list[float] = []
        self.recent: deque[float] = deque(maxlen=window)
        self.seen, self.warned, self._start = 0, False, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = self.clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None:
            return
        tokens = batch["input_ids"].numel() if isinstance(batch, dict) and "input_ids" in batch else 1
        self.record((self.clock() - self._start) / max(tokens, 1))

    def record(self, seconds_per_token: float) -> None:
        """One batch's time per token."""
        self.seen += 1
        if self.seen <= self.warmup:
            return
        if len(self.first) < self.window:
            self.first.append(seconds_per_token)
            return
        self.recent.append(seconds_per_token)
        if self.warned or len(self.recent) < self.window:
            return
        ratio = statistics.median(self.recent) / statistics.median(self.first)
        if ratio >= self.slower:
            self.warned = True
            if is_main():
                log.warning(
                    "training steps now take %.1fx as long per token as this run's first ones: other processes may "
                    "be competing for the %d cores (each torch process starts a thread per core). Give each its "
                    "share: OMP_NUM_THREADS=<cores / processes> (docs/running.md, 'Threads')",
                    ratio,
                    cores(),
                )
