"""Methods that also save, per process, the state they built (for the DDP tests).

Used as ``method._target_=tests.ddp_probe.RecordingFGGM +method.dump_dir=<dir>`` (or
RecordingTraceEWC): every process of the run writes ``<dir>/rank<r>-task<i>.pt``.
"""
from pathlib import Path

import torch

from cl_bench.distributed import rank
from methods.ewc_trace import TraceEWC
from methods.fggm import FGGM


class RecordingFGGM(FGGM):
    def __init__(self, dump_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.dump_dir = Path(dump_dir)

    def on_task_start(self, module, task, task_index: int) -> None:
        super().on_task_start(module, task, task_index)
        if self.mask is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"scores": self.last_scores, "masks": self.mask.masks},
                       self.dump_dir / f"rank{rank()}-task{task_index}.pt")


class RecordingTraceEWC(TraceEWC):
    """TRACE's EWC that also saves, per process, its F at the end of every task (for the DDP test)."""

    def __init__(self, dump_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.dump_dir = Path(dump_dir)

    def on_task_end(self, module, task, task_index: int) -> None:
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        torch.save({n: f.clone() for n, f in self.fisher.items()}, self.dump_dir / f"rank{rank()}-task{task_index}.pt")
        super().on_task_end(module, task, task_index)
