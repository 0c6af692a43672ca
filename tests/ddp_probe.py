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
            torch.save(
                {"scores": self.last_scores, "masks": self.mask.masks},
                self.dump_dir / f"rank{rank()}-task{task_index}.pt",
            )


class RecordingTraceEWC(TraceEWC):
    """TRACE's EWC that also saves, per process, its F at the end of every task (for the DDP test)."""

    def __init__(self, dump_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.dump_dir = Path(dump_dir)

    def on_task_end(self, module, task, task_index: int) -> None:
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        torch.save({n: f.clone() for n, f in self.fisher.items()}, self.dump_dir / f"rank{rank()}-task{task_index}.pt")
        super().on_task_end(module, task, task_index)


def unit_scores_worker(rank: int, port: int, out_dir: str) -> None:
    """One of 2 gloo processes: its rows of per-entry scores through unit_scores_of_shards, for
    every aggregation, and their overall mean (telemetry); saved for the test to compare with one
    process's."""
    import torch.distributed as dist

    from cl_bench.training.parameter_views import ParameterViews
    from cl_bench.training.sharding import shard_rows
    from methods.shared.fixed_mask import unit_scores_of_shards
    from methods.shared.importance import overall_mean

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    whole = {"w": torch.arange(35.0).view(5, 7) ** 1.5, "v": torch.arange(5.0) + 0.5}
    params = {n: torch.empty(t.shape, device="meta") for n, t in whole.items()}
    mine = {n: t[shard_rows(t.shape[0], 2, rank)] for n, t in whole.items()}
    views = ParameterViews(torch.nn.Module())
    views.sharded = True  # what the views of an FSDP model say; these rows stand in for its shards
    results = {
        f"{how}-{reduce}": unit_scores_of_shards(views, mine, params, how, reduce)
        for how in ("row", "column", "element")
        for reduce in ("sum", "mean")
    }
    results["mean"] = {"split": torch.tensor(overall_mean(mine, views), dtype=torch.float64)}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()
