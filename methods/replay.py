"""Experience replay: train each task together with remembered examples of the earlier ones.

After task t, a seeded uniform sample of its training examples is kept: ``per_task`` of them (when
set), else a fraction ``ratio`` of the split (TRACE's ``--past_task_ratio 0.1``; int(ratio * N) examples). From
the second task on, the task is trained on the concatenation of its own split, every kept sample,
and, if ``general_data`` names one, a general instruction set (a JSON list of prompt/answer records
in the task layout; TRACE replays LIMA). ``mode: concat`` shuffles them all together (each
remembered example once per epoch, as TRACE and GeRe mix data); ``mode: interleave`` makes every
global batch hold a fixed ``batch_share`` of remembered examples (round(share x batch_size), at
least 1), the task's own examples each once per epoch and the remembered ones cycled in seeded
order (cl_bench/data/batching.py). The buffer holds examples, not tensors, and is part of the
method's checkpointed state.

TRACE's ``training/replay.py`` does not concatenate: after each task it runs a separate epoch over
the kept samples of the tasks before it and the general set (docs/fidelity.md).
"""
from __future__ import annotations

import math
from pathlib import Path

from cl_bench.data.tasks import Example, read_split
from cl_bench.errors import ConfigError, check_choice, check_number
from cl_bench.rng import derive_seed
from methods.base import CLMethod
from methods.importance import sample_examples


MODES = ("concat", "interleave")


class Replay(CLMethod):
    name = "replay"
    # it edits no gradient, so every strategy that keeps parameters whole works
    supported_strategies = ("single_device", "ddp", "fsdp", "deepspeed")
    trains_lora = True  # its mechanism is the data (or nothing): adapters train as full weights would

    def __init__(self, per_task: int | None = None, ratio: float | None = 0.1, general_data: str | None = None,
                 mode: str = "concat", batch_share: float = 0.25, seed: int = 0):
        if per_task is None and ratio is None:
            raise ConfigError("method.per_task or method.ratio must be set (per_task wins when both are)")
        self.per_task = check_number(per_task, "method.per_task", integer=True, low=1, allow_none=True)
        self.ratio = check_number(ratio, "method.ratio", low=0, high=1, low_open=True, allow_none=True)
        self.general_data = general_data
        self.mode = check_choice(mode, MODES, "method.mode")
        self.batch_share = check_number(batch_share, "method.batch_share", low=0, high=1, low_open=True, high_open=True)
        self.per_batch: int | None = None
        self.seed = seed
        #: the kept examples of each finished task, in task order
        self.buffer: list[list[Example]] = []
        self.general: list[Example] = []

    def shared_slots(self, batch_size: int) -> int:
        """Remembered examples in every global batch of ``batch_size`` (mode interleave)."""
        slots = max(1, round(self.batch_share * batch_size))
        if slots >= batch_size:
            raise ConfigError(f"method.batch_share {self.batch_share} of train.batch_size {batch_size} leaves no room "
                              "for the task's own examples")
        return slots

    def check_run(self, cfg) -> None:
        super().check_run(cfg)
        if self.mode == "interleave":
            self.shared_slots(cfg.train.batch_size)

    def on_stream_start(self, module, stream) -> None:
        if self.mode == "interleave":
            self.per_batch = self.shared_slots(module.loaders.batch_size)
        if self.general_data is not None:
            self.general = read_split(Path(self.general_data).expanduser())

    def replayed(self) -> list[Example]:
        return [ex for kept in self.buffer for ex in kept] + (self.general if self.buffer else [])

    def training_examples(self, task, task_index: int) -> list[Example]:
        return list(task.train) + self.replayed()

    def replayed_per_batch(self, task, task_index: int) -> int | None:
        return self.per_batch if self.buffer else None

    def on_task_start(self, module, task, task_index: int) -> None:
        replayed = len(self.replayed())
        share = self.replayed_per_batch(task, task_index)
        fraction = replayed / (replayed + len(task.train)) if share is None else share / module.loaders.batch_size
        module.log_metrics({"replay/buffer_size": sum(len(kept) for kept in self.buffer),
                            "replay/replayed_fraction": fraction if replayed else 0.0})

    def on_task_end(self, module, task, task_index: int) -> None:
        n = self.per_task if self.per_task is not None else math.floor(self.ratio * len(task.train))
        self.buffer.append(sample_examples(task.train, n, derive_seed(self.seed, task_index)))

    def state_dict(self):
        return {"buffer": [[{"prompt": e.prompt, "answer": e.answer} for e in kept] for kept in self.buffer]}

    def load_state_dict(self, state_dict) -> None:
        self.buffer = [[Example(**e) for e in kept] for kept in state_dict["buffer"]]
