"""Continual evaluation: every task seen so far scored *during* training, every N optimizer steps,
on a small fixed subsample, so that transient forgetting (the stability gap) shows.

``eval.continual``:

    every_n_steps: null      # off; N = score after every N-th optimizer step and at each task's end
    max_examples: 16         # the first this many examples of each task's ``eval.split``
    measure: loglik          # loglik (the answers' mean per-token log-likelihood, one forward pass)
                             # | metric (generate and score with the task's metric, 0-100)
    measures: null           # per-task exceptions, e.g. eval.continual.measures={sentiment: metric}
    windows: [10, 100]       # WF^w windows, in evaluations
    before_first_step: false # true: one point before the stream's first update (the authors' x = -1),
                             # which enters the first task's forgetting window
    resample: false          # true: each evaluation draws its own max_examples of each task (seeded by
                             # the run's seed and the stream step), as the authors' set_subset_idxs does
                             # at every iteration; false: the same first examples every time

The evaluator is a Lightning callback of every task's fit. A point is (stream step, index of the
task in training, each seen task's score, the seconds it took); the points of the running task are callback state, so
step checkpoints carry them and a resumed run keeps its curve. Scoring never touches the global
random generators (a run with continual evaluation trains bitwise as one without) and runs in
every process, in lockstep (the ``metric`` measure generates sharded, as the stage evaluation).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from cl_bench.data.loaders import TaskLoaders
from cl_bench.data.tasks import Task, TaskStream
from cl_bench.data.tokenization import IGNORE_INDEX
from cl_bench.errors import ConfigError, check_choice, check_flag, check_number
from cl_bench.evaluation.generation import GenerationConfig, evaluate_task
from cl_bench.generation.engine import Engine
from cl_bench.rng import derive_seed, preserved_rng
from cl_bench.training.lm import answer_log_likelihood, eval_mode

MEASURES = ("loglik", "metric")


@dataclass(frozen=True)
class ContinualSettings:
    """``eval.continual``, checked (see the module doc)."""

    every_n_steps: int | None = None
    max_examples: int = 16
    measures: dict[str, str] = field(default_factory=dict)
    windows: tuple[int, ...] = (10, 100)
    before_first_step: bool = False
    resample: bool = False

    @property
    def enabled(self) -> bool:
        return self.every_n_steps is not None

    @classmethod
    def from_config(cls, node: DictConfig | None, task_names: Sequence[str]) -> ContinualSettings:
        """Every key checked by name; ``measures`` must name tasks of the stream."""
        if node is None:
            return cls()
        node = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        unknown = set(node) - {
            "every_n_steps",
            "max_examples",
            "measure",
            "measures",
            "windows",
            "before_first_step",
            "resample",
        }
        if unknown:
            raise ConfigError(f"eval.continual has no key {sorted(unknown)[0]!r}")
        every = check_number(
            node.get("every_n_steps"), "eval.continual.every_n_steps", integer=True, low=1, allow_none=True
        )
        max_examples = check_number(node.get("max_examples", 16), "eval.continual.max_examples", integer=True, low=1)
        default = check_choice(node.get("measure", "loglik"), MEASURES, "eval.continual.measure")
        overrides = node.get("measures") or {}
        for name, measure in overrides.items():
            if name not in task_names:
                raise ConfigError(f"eval.continual.measures.{name}: no task {name!r} in the stream {list(task_names)}")
            check_choice(measure, MEASURES, f"eval.continual.measures.{name}")
        windows = node.get("windows", [10, 100])
        if not isinstance(windows, (list, tuple)):
            raise ConfigError(f"eval.continual.windows must be a list of integers >= 2, got {windows!r}")
        for w in windows:
            check_number(w, "eval.continual.windows", integer=True, low=2)
        flags = {
            key: check_flag(node.get(key, False), f"eval.continual.{key}") for key in ("before_first_step", "resample")
        }
        return cls(every, max_examples, {n: overrides.get(n, default) for n in task_names}, tuple(windows), **flags)


@torch.no_grad()
def mean_answer_log_likelihood(model: torch.nn.Module, loader, device: torch.device) -> float:
    """The mean over examples of each answer's mean per-token log p (answer + EOS | prompt)."""
    per_example = []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens = (batch["labels"] != IGNORE_INDEX).sum(-1).clamp(min=1)
        per_example.append(answer_log_likelihood(model, batch) / tokens)
    return torch.cat(per_example).mean().item()


class ContinualEvaluator(Callback):
    """Scores the seen tasks every ``every_n_steps`` optimizer steps and at the end of each fit."""

    @classmethod
    def of_run(cls, settings: ContinualSettings, *args: Any, **kwargs: Any) -> ContinualEvaluator | None:
        """The run's evaluator (the arguments of the constructor), None when ``eval.continual`` is off."""
        return cls(settings, *args, **kwargs) if settings.enabled else None

    def __init__(
        self,
        settings: ContinualSettings,
        stream: TaskStream,
        tokenizer,
        loaders: TaskLoaders,
        generation: GenerationConfig,
        split: str,
        seed: int = 0,
        engine: Engine | None = None,
    ):
        """``engine``: the run's generation engine (Hugging Face ``generate`` when None)."""
        self.settings = settings
        self.engine = engine
        self.tokenizer = tokenizer
        self.generation = generation
        self.split = split
        self.seed = seed
        #: a drawn subsample is tokenized anew each time (a cache entry per draw would fill the disk)
        self.passes = dataclasses.replace(loaders, cache_dir=None).passes
        self.tasks: dict[str, Task] = {t.name: t for t in stream}
        self.loaders = {
            t.name: loaders.passes(t.splits[split][: settings.max_examples])
            for t in stream
            if settings.measures[t.name] == "loglik"
        }
        #: the task in training (its index) and the tasks scored meanwhile
        self.training = 0
        self.seen: list[str] = []
        #: this fit's points, and the last global step scored
        self.points: list[dict[str, Any]] = []
        self.last_step = -1

    def begin_task(self, index: int, seen: Sequence[str]) -> None:
        self.training, self.seen = index, list(seen)
        self.points, self.last_step = [], -1

    def take_points(self) -> list[dict[str, Any]]:
        """This fit's points (the evaluator starts the next fit empty)."""
        points, self.points = self.points, []
        return points

    def subsample(self, name: str, step: int) -> Task:
        """``resample``: task ``name`` with ``max_examples`` of its split drawn for the evaluation at
        stream step ``step`` (the same draw on every process and on a resume)."""
        task = self.tasks[name]
        examples = task.splits[self.split]
        k = min(self.settings.max_examples, len(examples))
        order = torch.randperm(
            len(examples), generator=torch.Generator().manual_seed(derive_seed(derive_seed(self.seed, step), name))
        )
        return Task(task.spec, {self.split: [examples[int(i)] for i in order[:k].sort().values]}, task.epochs)

    def score(self, model: torch.nn.Module, name: str, step: int = 0) -> float:
        task = self.subsample(name, step) if self.settings.resample else self.tasks[name]
        if self.settings.measures[name] == "metric":
            engine, cap = self.engine or model, self.settings.max_examples
            return evaluate_task(engine, self.tokenizer, task, self.generation, self.split, cap).score
        loader = self.passes(task.splits[self.split]) if self.settings.resample else self.loaders[name]
        with eval_mode(model):
            return mean_answer_log_likelihood(model, loader, next(model.parameters()).device)

    def evaluate(self, trainer, pl_module) -> None:
        start = time.perf_counter()
        generates = self.engine is not None and any(self.settings.measures[n] == "metric" for n in self.seen)
        if generates:  # the engine takes this step's weights
            self.engine.sync(pl_module.model, pl_module.weights_version)
        with preserved_rng():
            scores = {name: self.score(pl_module.model, name, pl_module.stream_step) for name in self.seen}
        if generates:
            self.engine.rest()
        step = pl_module.stream_step
        self.points.append(
            {
                "step": step,
                "training": self.training,
                "scores": scores,
                "seconds": round(time.perf_counter() - start, 3),
            }
        )
        self.last_step = trainer.global_step
        if pl_module.metric_sink is not None:
            pl_module.metric_sink({f"continual/{name}": v for name, v in scores.items()}, step)

    def on_train_start(self, trainer, pl_module) -> None:
        """``before_first_step``: the point before the stream's first update (the authors' x = -1)."""
        if self.settings.before_first_step and pl_module.stream_step == 0 and not self.points:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step != self.last_step and step % self.settings.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self.last_step:
            self.evaluate(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"training": self.training, "seen": self.seen, "points": self.points, "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.training, self.seen = state["training"], state["seen"]
        self.points, self.last_step = state["points"], state["last_step"]
