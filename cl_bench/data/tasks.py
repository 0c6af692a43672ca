"""Tasks and task streams read from TRACE's on-disk layout.

A stream lives in ``<data_dir>/<Task>/{train,eval,test}.json``; each file is a JSON list of
``{"prompt": str, "answer": str}`` records (other keys are ignored). Every stream, the embedded
one included, goes through :func:`load_stream`, so the data's validation lives here (the metrics'
names are the evaluation's to check: cl_bench/evaluation/metrics.py, ``resolve_metrics``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_bench.errors import ConfigError, check_choice, check_flag, check_number, check_numbers

SPLITS = ("train", "eval", "test")
#: ``tasks.scorers``: the project's metrics, or TRACE's own scorers (cl_bench/evaluation/metrics.py
#: maps each declared metric to the scorer of the set: ``resolve_metrics``)
SCORERS = ("project", "trace")


@dataclass(frozen=True)
class Example:
    prompt: str
    #: what the model is trained to answer (and scored against when there are no ``references``)
    answer: str
    #: every reference answer a prediction is scored against (SuperNI's instances have several);
    #: empty: ``answer`` alone
    references: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "references", tuple(self.references))  # a list from a checkpoint

    @property
    def scored_against(self) -> str | tuple[str, ...]:
        """What a metric scores a prediction of this example against: its references, or its answer."""
        return self.references or self.answer


@dataclass(frozen=True)
class TaskSpec:
    """What a task is scored with, independent of where its data lies."""

    name: str
    metric: str
    max_new_tokens: int
    #: the task's own number of epochs, used when the stream does not set ``epochs``
    epochs: int = 1
    #: metrics recorded beside ``metric`` (results.json's ``also``; not in R), e.g. SuperNI's exact
    #: match beside its ROUGE-L
    also: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "also", tuple(self.also))  # a list from a config


@dataclass
class Task:
    """One task of a stream: its data, its metric and its training budget."""

    spec: TaskSpec
    splits: dict[str, list[Example]]
    epochs: int
    max_steps: int | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def metric(self) -> str:
        return self.spec.metric

    @property
    def train(self) -> list[Example]:
        return self.splits["train"]

    @property
    def test(self) -> list[Example]:
        return self.splits["test"]


@dataclass
class TaskStream:
    """An ordered list of tasks; ``tasks[t]`` is trained at stage t+1."""

    tasks: list[Task] = field(default_factory=list)
    #: how the tasks' metrics are scored: "project" or "trace" (TRACE's own scorers, on the raw
    #: decoded answers; see cl_bench/evaluation/trace_metrics.py)
    scorers: str = "project"
    #: the files the stream was read from, by what they hold ("<task>/<split>", "<task>/labels", ...):
    #: what a run's data manifest hashes (cl_bench/data/manifest.py)
    files: dict[str, Path] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    def __getitem__(self, i: int) -> Task:
        return self.tasks[i]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]


def joint_task(stream: TaskStream) -> Task:
    """The multi-task reference: one task trained on the union of the stream's training splits,
    each task's examples repeated as many times as it has epochs (one pass over the union then
    gives every example its own number of passes)."""
    train = [ex for task in stream for _ in range(task.epochs) for ex in task.train]
    return Task(TaskSpec("joint", "mixed", 0), {"train": train}, epochs=1)


def training_plan(stream: TaskStream, joint: bool, shuffle: bool) -> list[Task]:
    """What a run trains, in order: the stream's tasks, or (``tasks.joint=true``) their union."""
    check_flag(joint, "tasks.joint")
    if not joint:
        return list(stream)
    if any(t.max_steps is not None for t in stream):
        raise ConfigError(
            "tasks.max_steps caps each task of a sequence; a joint run (tasks.joint=true) trains "
            "one union of them: unset tasks.max_steps"
        )
    if not shuffle:
        raise ConfigError("a joint run (tasks.joint=true) needs train.shuffle=true, or it trains the tasks in turn")
    return [joint_task(stream)]


def read_text(path: Path) -> str:
    """A UTF-8 file's text; an unreadable or non-UTF-8 file is refused in one line naming it."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}: {e.reason})"
        ) from None


def parse_json(path: Path, text: str):
    """``text`` (of ``path``) parsed as JSON; malformed JSON refused in one line naming the file."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno})") from None


def json_list(path: Path, text: str, what: str) -> list:
    """``text`` (of ``path``) parsed as a JSON list of ``what``; anything else refused by name."""
    records = parse_json(path, text)
    if not isinstance(records, list):
        raise ConfigError(f"{path}: expected a JSON list of {what}, got {type(records).__name__}")
    return records


def read_split(path: Path) -> list[Example]:
    """Read one split file, refusing anything that is not a non-empty list of prompt/answer strings.
    Every error names the file and says what is wrong in one line; none quotes the file's contents."""
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; expected a JSON file")
    if not path.is_file():
        raise ConfigError(f"missing split file: {path}")
    records = non_empty(path, json_list(path, read_text(path), "records"))
    return [
        Example(record_text(path, i, r, "prompt"), record_text(path, i, r, "answer")) for i, r in enumerate(records)
    ]


def non_empty(path: Path, records: list) -> list:
    """``records`` of the split ``path``, refused by name when there are none (a task with no
    examples would fail later, mid-run, with nothing to say which file)."""
    if not records:
        raise ConfigError(f"{path}: the split is empty")
    return records


def text(path: Path, where: str, value: Any) -> str:
    """``value`` (``where`` in ``path``: "record 3 'label'") as text a tokenizer can encode: a
    string without lone surrogates (valid JSON, e.g. "\\ud800", but no text); else refused in one line."""
    if not isinstance(value, str):
        raise ConfigError(f"{path}: {where} is a {type(value).__name__}, expected a string")
    if not value.isascii() and any("\ud800" <= c <= "\udfff" for c in value):
        raise ConfigError(
            f"{path}: {where} holds a lone surrogate (an escape such as \\ud800 without its pair), "
            "which is not text a tokenizer can encode"
        )
    return value


def record_text(path: Path, i: int, record: Any, key: str) -> str:
    """Record ``i``'s ``key`` in the split ``path``, checked by :func:`text`."""
    if not isinstance(record, dict):
        raise ConfigError(f"{path}: record {i} is a {type(record).__name__}, expected an object")
    if key not in record:
        raise ConfigError(f"{path}: record {i} has no '{key}' key")
    return text(path, f"record {i} '{key}'", record[key])


def check_task_specs(specs: Sequence[TaskSpec]) -> None:
    """Each task's name is unique and of letters, digits, '.', '_' and '-' only (a folder, a logger
    key, a table column: '$', '|' or Rich's '[...]' break them); ``max_new_tokens`` an integer >= 1."""
    seen = set()
    for spec in specs:
        name = spec.name
        if not isinstance(name, str) or name in (".", "..") or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise ConfigError(f"task name {name!r} is not a plain folder name: letters, digits, '.', '_' and '-' only")
        if name in seen:
            raise ConfigError(f"task name {name!r} is declared twice in tasks.tasks")
        seen.add(name)
        check_number(spec.max_new_tokens, f"task {name}: max_new_tokens", integer=True, low=1)


def per_task_values(value: Any, n: int, key: str, allow_none: bool = False) -> list:
    """Expand a scalar or a per-task list to n values (>= 1 each), naming ``key`` on error."""
    if value is None:
        if allow_none:
            return [None] * n
        raise ConfigError(f"{key} must be set")
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value] * n
    if len(values) != n:
        raise ConfigError(f"{key} has {len(values)} values but the stream has {n} tasks")
    return check_numbers(values, key, integer=True, low=1, allow_none=allow_none)


def resolve_order(
    order: str | Sequence[str] | None,
    known: Sequence[str],
    orders: dict[str, Sequence[str]] | None = None,
    key: str = "tasks.order",
) -> list[str]:
    """The task names in training order: a list, the name of one of ``orders``, or None for the
    order in which the tasks are declared."""
    if order is None:
        return list(known)
    if isinstance(order, str):
        orders = orders or {}
        if order not in orders:
            raise ConfigError(
                f"{key}={order!r} is not a named order; known: {sorted(orders)} (or give a list of tasks)"
            )
        return resolve_order(list(orders[order]), known, None, f"tasks.orders.{order}")
    order = list(order)
    unknown = [n for n in order if n not in known]
    if unknown:
        raise ConfigError(f"{key} names unknown task(s) {unknown}; known: {list(known)}")
    repeated = sorted({n for n in order if order.count(n) > 1})
    if repeated:
        raise ConfigError(f"{key} names task(s) {repeated} more than once")
    if not order:
        raise ConfigError(f"{key} is empty")
    return order


def select_subset(names: list[str], subset: Sequence[str] | None) -> list[str]:
    """The tasks of ``names`` that are in ``subset`` (None = all), in the order of ``names``."""
    if subset is None:
        return names
    subset = list(subset)
    outside = [n for n in subset if n not in names]
    if outside:
        raise ConfigError(f"tasks.subset names task(s) {outside} that are not in the stream {names}")
    if not subset:
        raise ConfigError("tasks.subset is empty")
    return [n for n in names if n in subset]


def stream_epochs(epochs, specs: list[TaskSpec]) -> list[int]:
    """Epochs per task: ``epochs`` (one value or one per task) or, when None, each task's own."""
    if epochs is not None:
        return per_task_values(epochs, len(specs), "tasks.epochs")
    return per_task_values([s.epochs for s in specs], len(specs), "tasks.tasks[].epochs")


def check_caps(max_examples: dict[str, int | None] | None, splits: Sequence[str]) -> dict[str, int | None]:
    caps = dict(max_examples or {})
    unknown = [k for k in caps if k not in splits]
    if unknown:
        raise ConfigError(f"tasks.max_examples has unknown split(s) {unknown}; splits are {list(splits)}")
    for split, cap in caps.items():
        check_number(cap, f"tasks.max_examples.{split}", integer=True, low=1, allow_none=True)
    return caps


def stream_plan(
    tasks: Sequence[dict | TaskSpec],
    order: str | Sequence[str] | None,
    orders: dict[str, Sequence[str]] | None,
    subset: Sequence[str] | None,
    epochs: int | Sequence[int] | None,
    max_steps: int | Sequence[int] | None,
) -> tuple[dict[str, TaskSpec], list[str], list[int], list]:
    """What a stream config declares, checked: the task specs by name, the tasks in their order
    (``order`` a list or the name of one of ``orders``; ``subset`` keeps some), and each one's epochs
    and step cap (module docstring of :func:`load_stream`)."""
    specs = [t if isinstance(t, TaskSpec) else TaskSpec(**t) for t in tasks]
    check_task_specs(specs)
    by_name = {s.name: s for s in specs}
    names = select_subset(resolve_order(order, [s.name for s in specs], orders), subset)
    epoch_list = stream_epochs(epochs, [by_name[n] for n in names])
    step_list = per_task_values(max_steps, len(names), "tasks.max_steps", allow_none=True)
    return by_name, names, epoch_list, step_list


def data_root(data_dir: str | Path | None, data_help: str = "") -> tuple[Path, str]:
    """``tasks.data_dir`` as a folder that exists, and the text that says how to get the data (for
    the errors that follow); an unset or missing folder refused with it."""
    help_text = f"\n{data_help.strip()}" if data_help else ""
    if data_dir is None:
        raise ConfigError(f"tasks.data_dir is not set{help_text}")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"tasks.data_dir does not exist or is not a folder: {root}{help_text}")
    return root, help_text


def missing_data(root: Path, names: Sequence[str], splits: Sequence[str]) -> list[str]:
    """The task folders and split files of the stream that ``root`` lacks."""
    missing = []
    for name in names:
        if not (root / name).is_dir():
            missing.append(f"{name}/")
        else:
            missing += [f"{name}/{split}.json" for split in splits if not (root / name / f"{split}.json").is_file()]
    return missing


def load_stream(
    data_dir: str | Path | None,
    tasks: Sequence[dict | TaskSpec],
    order: str | Sequence[str] | None = None,
    epochs: int | Sequence[int] | None = None,
    max_steps: int | Sequence[int] | None = None,
    splits: Sequence[str] = SPLITS,
    orders: dict[str, Sequence[str]] | None = None,
    subset: Sequence[str] | None = None,
    max_examples: dict[str, int | None] | None = None,
    data_help: str = "",
    scorers: str = "project",
) -> TaskStream:
    """Load a stream from ``data_dir`` in TRACE's layout.

    ``tasks`` declares each task's name, metric, ``max_new_tokens`` and (optionally) its own
    epochs; ``order`` is a list of names or the name of one of ``orders``; ``subset`` keeps some
    tasks of that order. ``epochs`` and ``max_steps`` are a scalar or one value per task of the
    resulting stream (``epochs: None`` = each task's own, so epochs follow their task when the
    order changes). ``max_examples`` caps each task's splits (``{"train": 100}``). Everything is
    validated, and every missing file named (with ``data_help`` on how to get the data), before
    anything is returned; the metrics' names are the evaluation's to check (``resolve_metrics``).
    """
    check_choice(scorers, SCORERS, "tasks.scorers")
    by_name, names, epoch_list, step_list = stream_plan(tasks, order, orders, subset, epochs, max_steps)
    caps = check_caps(max_examples, splits)
    root, help_text = data_root(data_dir, data_help)
    missing = missing_data(root, names, splits)
    if missing:
        raise ConfigError(f"tasks.data_dir {root} is incomplete; missing: {', '.join(missing)}{help_text}")
    stream = TaskStream(scorers=scorers)
    for name, ep, steps in zip(names, epoch_list, step_list):
        loaded = {split: read_split(root / name / f"{split}.json")[: caps.get(split)] for split in splits}
        stream.files.update({f"{name}/{split}": root / name / f"{split}.json" for split in splits})
        stream.tasks.append(Task(by_name[name], loaded, epochs=ep, max_steps=steps))
    return stream
