"""What the report compares of a run: its results.json's numbers (:data:`METRICS`, which way is
better for each), the settings that decide its result (:func:`result_settings`: two runs equal in
them but the seed are repeats of one experiment), and the record of one run (:class:`RunResult`)
or of a file left out (:class:`Refused`). Reading and checking the files: cl_bench/recording/reading.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_bench.config import current_settings, flat_settings

#: the numbers a group is summarised by: key -> how to read it from a results.json. Some exist only
#: in some runs, and a report shows a column only where a row has it: the continual-evaluation
#: metrics (avg_min_acc, wc_acc, wf10: runs with eval.continual), the per-example flips
#: (ex_forgotten, ex_gained: results.json's example_forgetting), the KL to the base model on each
#: task just learned (kl_new: eval.kl_to_base), an on-policy paradigm's telemetry (reward,
#: skipped_groups: results.json's learning.tasks, GRPO and self-SFT; :func:`learning_values`)
METRICS = (
    "op",
    "mean_op",
    "bwt",
    "fwt",
    "forgetting",
    "new_task",
    "delta_RG",
    "general_before",
    "general_after",
    "avg_min_acc",
    "wc_acc",
    "wf10",
    "ex_forgotten",
    "ex_gained",
    "kl_new",
    "reward",
    "skipped_groups",
    "wall_min",
    "cpu_min",
)


#: what a run cost, not what it achieved: summarised, never paired
TIMINGS = ("wall_min", "cpu_min")


#: the continual-evaluation metrics (results.json's continual_metrics; only runs with eval.continual)
CONTINUAL_METRICS = ("avg_min_acc", "wc_acc", "wf10")


#: which way each metric is better: a paired difference > 0 is a gain for "higher", a loss for "lower"
BETTER = {
    "op": "higher",
    "mean_op": "higher",
    "bwt": "higher",
    "fwt": "higher",
    "forgetting": "lower",
    "new_task": "higher",
    "delta_RG": "higher",
    "general_before": "higher",
    "general_after": "higher",
    "avg_min_acc": "higher",
    "wc_acc": "higher",
    "wf10": "lower",
    "ex_forgotten": "lower",
    "ex_gained": "higher",
    "kl_new": "lower",
    "reward": "higher",
    "skipped_groups": "lower",
    "wall_min": "lower",
    "cpu_min": "lower",
}


def new_task_score(R: list[list[float]]) -> float | None:
    """Each task's score right after it was trained, averaged (mean of R[t+1][t]; the plasticity a
    method's forgetting is traded against); None before a task is trained."""
    diagonal = [R[t + 1][t] for t in range(min(len(R) - 1, len(R[0]) if R else 0))]
    return sum(diagonal) / len(diagonal) if diagonal else None


#: settings that cannot change what a run computes: two runs that differ only in these (and the
#: seed) are repeats of one experiment. A dotted key covers everything below it.
NOT_RESULT_KEYS = (
    "seed",
    "run_name",
    "run_group",
    "objective",
    "resume",
    "dry_run",
    "heartbeat_s",
    "checkpoint",
    "paths",
    "logger",
    "train.token_cache",
    "model.cache_dir",
    "tasks.cache_dir",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "tasks.protocol",
    "tasks.data_help",
)


#: where a stream's files lay: a run that recorded its data's digest is told apart by that instead
DATA_PATH_KEYS = ("tasks.data_dir", "tasks.instruction_config")


def result_settings(config: dict, data_hashed: bool = False) -> dict[str, Any]:
    """The resolved config as dotted keys, less :data:`NOT_RESULT_KEYS` and the seeds that follow the
    run's seed (``model.seed: ${seed}``, ``method.adapters.seed: ${seed}``: a ``*.seed`` equal to it):
    what decides a run's result, repeats aside. ``data_hashed``: the run recorded its data manifest,
    which then tells its data apart instead of where its files lay (:data:`DATA_PATH_KEYS`)."""
    ignored = (*NOT_RESULT_KEYS, *DATA_PATH_KEYS) if data_hashed else NOT_RESULT_KEYS
    return {
        k: v
        for k, v in current_settings(flat_settings(config, ignored)).items()
        if not (k.endswith(".seed") and v == config.get("seed"))
    }


@dataclass
class RunResult:
    """One run dir's results.json, with what grouping needs."""

    path: Path
    status: str
    error: str | None
    method: str
    settings: dict[str, Any]
    stream: str
    order: tuple[str, ...]
    model: str
    seed: Any
    joint: bool
    R: list[list[float]]
    values: dict[str, float | None] = field(default_factory=dict)
    #: results.json's ``continual`` (the continual-evaluation curves), when the run had them
    continual: dict[str, Any] | None = None
    #: the digest of the data the run read (results.json's ``data.manifest_sha256``; None before
    #: runs recorded it)
    data: str | None = None
    #: values outside R that were not finite numbers (NaN, an infinity), read as missing: where ->
    #: what they were (in the file, or as the run recorded them in results.json's ``non_finite``)
    non_finite: dict[str, str] = field(default_factory=dict)
    #: tasks an on-policy paradigm learned nothing on, and why (results.json's learning.tasks.<task>.warnings)
    unlearned: dict[str, str] = field(default_factory=dict)


@dataclass
class Refused:
    """A results.json the report leaves out, and why (the report's "Not included" table)."""

    path: Path
    reason: str
