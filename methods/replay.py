"""Experience replay: train each task together with remembered examples of the earlier ones.

After task t, ``per_task`` of its training examples are kept (when set), else a fraction ``ratio``
of the split (TRACE's ``--past_task_ratio 0.1``; int(ratio * N) examples): a seeded uniform sample
(``sample: random``) or the first ones in file order (``sample: first``, TRACE's
``utils/data/data_utils.py``). ``general_data`` names a general instruction set replayed with them
(a JSON list of prompt/answer records in the task layout; TRACE replays all of LIMA, which cannot
ship here: point ``general_data`` at LIMA's train.json converted to prompt/answer records).

When the remembered examples are trained (``mode``):
- ``concat``: shuffled into every later task's training data, so each is seen once per epoch of
  every later task (on TRACE's epochs 5,3,7,5,3,5,5,7, task 1's sample 35 times);
- ``interleave``: every global batch of a later task holds a fixed ``batch_share`` of remembered
  examples (round(share x batch_size), at least 1), the task's own examples each once per epoch and
  the remembered ones cycled in seeded order (cl_bench/data/batching.py);
- ``trace``: TRACE's ``training/replay.py``: after each task, the first and the last included, one
  separate epoch over the kept examples of the tasks *before* it plus the general set (after the
  first task: the general set alone, or nothing without one), with the run's optimizer; the task
  is evaluated after that epoch. Task 1's sample is then replayed once per later task (7 times on
  TRACE's 8 tasks). ``experiment=trace`` selects it with ``sample: first``.

The buffer holds examples, not tensors, and is part of the method's checkpointed state.
"""

from __future__ import annotations

import math
from pathlib import Path

from cl_bench.data.tasks import Example, read_split
from cl_bench.errors import ConfigError, check_choice, check_number
from cl_bench.rng import derive_seed
from methods.base import CLMethod
from methods.shared.importance import sample_examples

MODES = ("concat", "interleave", "trace")
SAMPLES = ("random", "first")


class Replay(CLMethod):
    name = "replay"
    # it edits no gradient, so every strategy that keeps parameters whole works
    supported_strategies = ("single_device", "ddp", "fsdp", "deepspeed")
    trains_lora = True  # its mechanism is the data (or nothing): adapters train as full weights would

    def __init__(
        self,
        per_task: int | None = None,
        ratio: float | None = 0.1,
        general_data: str | None = None,
        mode: str = "concat",
        batch_share: float = 0.25,
        sample: str = "random",
        seed: int = 0,
    ):
        if per_task is None and ratio is None:
            raise ConfigError("method.per_task or method.ratio must be set (per_task wins when both are)")
        self.per_task = check_number(per_task, "method.per_task", integer=True, low=1, allow_none=True)
        self.ratio = check_number(ratio, "method.ratio", low=0, high=1, low_open=True, allow_none=True)
        self.general_data = general_data
        if general_data is not None:  # its general examples belong to no task: nothing scores a completion of them
            self.learning_paradigms = ("sft",)
            self.learning_refusal = (
                "its general_data examples belong to no task of the stream, so no scorer rewards them"
            )
        self.mode = check_choice(mode, MODES, "method.mode")
        self.sample = check_choice(sample, SAMPLES, "method.sample")
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
            raise ConfigError(
                f"method.batch_share {self.batch_share} of train.batch_size {batch_size} leaves no room "
                "for the task's own examples"
            )
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
        """What a later task trains with in modes concat and interleave."""
        if self.mode == "trace":
            return []
        return [ex for kept in self.buffer for ex in kept] + (self.general if self.buffer else [])

    def training_examples(self, task, task_index: int) -> list[Example]:
        return list(task.train) + self.replayed()

    def after_task_epoch(self, task, task_index: int) -> list[Example]:
        """Mode trace: the kept examples of the tasks before ``task_index`` and the general set."""
        if self.mode != "trace":
            return []
        return [ex for kept in self.buffer[:task_index] for ex in kept] + self.general

    def replayed_per_batch(self, task, task_index: int) -> int | None:
        return self.per_batch if self.buffer else None

    def on_task_start(self, module, task, task_index: int) -> None:
        replayed = len(self.replayed())
        share = self.replayed_per_batch(task, task_index)
        fraction = replayed / (replayed + len(task.train)) if share is None else share / module.loaders.batch_size
        module.log_metrics(
            {
                "replay/buffer_size": sum(len(kept) for kept in self.buffer),
                "replay/replayed_fraction": fraction if replayed else 0.0,
            }
        )

    def on_task_end(self, module, task, task_index: int) -> None:
        n = self.per_task if self.per_task is not None else math.floor(self.ratio * len(task.train))
        kept = (
            list(task.train[:n])
            if self.sample == "first"
            else sample_examples(task.train, n, derive_seed(self.seed, task_index))
        )
        self.buffer.append(kept)

    def state_dict(self):
        return {"buffer": [[{"prompt": e.prompt, "answer": e.answer} for e in kept] for kept in self.buffer]}

    def load_state_dict(self, state_dict) -> None:
        self.buffer = [[Example(**e) for e in kept] for kept in state_dict["buffer"]]
