"""General ability kept through the stream, measured with lm-evaluation-harness.

TRACE reports general ability before and after the stream (MMLU, GSM8K, BBH, TyDiQA, BoolQ, PIQA)
and delta R^G = mean over benchmarks of (after - before). Here the benchmarks are any lm-eval tasks
(or groups), each reported by one metric of its results on 0-100, evaluated on the in-memory model
through ``HFLM(pretrained=model, tokenizer=tokenizer)``. The project ships an offline probe,
``cl_bench_probe`` (``cl_bench/evaluation/general/``): 280 four-way multiple-choice questions written for this
project (facts, arithmetic, reading, commonsense), scored by log-likelihood.

The harness reseeds Python's, NumPy's and torch's global generators; they are restored afterwards,
so turning the evaluation on or off does not change training.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cl_bench.distributed import barrier, is_main
from cl_bench.errors import ConfigError, check_number
from cl_bench.progress import doing
from cl_bench.rng import preserved_rng
from cl_bench.training.lm import eval_mode

#: lm-eval task configs shipped with the project (the offline probe)
PROJECT_TASKS = Path(__file__).parent / "general"
#: the offline probe's task name: left out of the summary scores when other benchmarks ran beside it
PROBE_TASK = "cl_bench_probe"


@functools.lru_cache(maxsize=4)
def _task_index(include_paths: tuple[str, ...], defaults: bool):
    """lm-eval's index of the tasks under ``include_paths`` (and of its own, ``defaults``), built
    once per process: the harness's own take about 7 s to index, and a sweep's jobs in one process
    (the basic launcher, Optuna) or several checks would index them again."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths), include_defaults=defaults, verbosity="ERROR")


@dataclass
class GeneralAbility:
    """Which lm-eval benchmarks to run, with which metric, and when."""

    #: lm-eval task or group name -> the key of the metric reported, as in its results ("acc,none")
    tasks: dict[str, str] = field(default_factory=dict)
    #: also evaluate after every task (always: before the stream and after the last task)
    every_task: bool = False
    batch_size: int = 16
    num_fewshot: int | None = None
    #: at most this many examples per task (quick runs); None = all
    limit: int | None = None
    #: further folders of lm-eval task YAMLs
    include_paths: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.tasks = dict(self.tasks or {})
        for name, metric in self.tasks.items():
            if not isinstance(metric, str) or not metric:
                raise ConfigError(
                    f"general.tasks.{name} must name a metric of its results (e.g. 'acc,none'), got {metric!r}"
                )
        check_number(self.batch_size, "general.batch_size", integer=True, low=1)
        check_number(self.limit, "general.limit", integer=True, low=1, allow_none=True)
        self._manager = None

    @property
    def enabled(self) -> bool:
        return bool(self.tasks)

    def task_manager(self):
        """lm-eval's task index over the project's and ``include_paths``' tasks, plus the harness's
        own only when a requested task needs them (indexing those takes ~10 s)."""
        if self._manager is None:
            paths = (str(PROJECT_TASKS), *(str(Path(p).expanduser()) for p in self.include_paths))
            local = _task_index(paths, defaults=False)
            known = set(local.all_tasks)
            full = all(t in known for t in self.tasks)
            self._manager = local if full else _task_index(paths, defaults=True)
        return self._manager

    def describe(self, tasks_trained: int) -> str | None:
        """What the evaluations cost, for the run's opening line; None when off."""
        if not self.enabled:
            return None
        questions = "all" if self.limit is None else f"at most {self.limit}"
        quick = "; general.limit=N or general=none for a quick run" if self.limit is None else ""
        return (
            f"{', '.join(self.tasks)} ({questions} questions per benchmark) at "
            f"{tasks_trained + 1 if self.every_task else 2} stages{quick}"
        )

    def check(self) -> None:
        """Refuse task names the harness does not know, before anything is trained."""
        if not self.enabled:
            return
        known = set(self.task_manager().all_tasks)
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            raise ConfigError(
                f"general.tasks: lm-eval does not know task(s) {unknown} "
                f"(project tasks: {sorted(p.stem for p in PROJECT_TASKS.glob('*.yaml'))}; "
                f"list the harness's with `lm_eval --tasks list`)"
            )

    def evaluate_on_main(self, model: torch.nn.Module, tokenizer) -> tuple[dict[str, float], float] | None:
        """(scores, seconds) on the main process, None on the others and when off: the harness runs
        in one process here, and the other processes wait for it."""
        if not self.enabled:
            return None
        out = None
        if is_main():
            doing(f"general ability ({', '.join(self.tasks)}, lm-eval)")
            start = time.perf_counter()
            out = self.evaluate(model, tokenizer), time.perf_counter() - start
        barrier()
        return out

    def evaluate(self, model: torch.nn.Module, tokenizer) -> dict[str, float]:
        """Each benchmark's score (0-100) for ``model`` as it is now."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        with preserved_rng(), eval_mode(model):  # (the harness sets eval mode itself; this puts training back)
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
            out = simple_evaluate(
                model=lm,
                tasks=list(self.tasks),
                num_fewshot=self.num_fewshot,
                limit=self.limit,
                task_manager=self.task_manager(),
                log_samples=False,
                bootstrap_iters=0,
                verbosity="ERROR",
            )
        scores = {}
        for task, metric in self.tasks.items():
            results = out["results"].get(task, {})
            if metric not in results:
                raise ConfigError(
                    f"general.tasks.{task}: its results have no metric '{metric}'; they have {sorted(results)}"
                )
            scores[task] = 100.0 * float(results[metric])
        return scores
