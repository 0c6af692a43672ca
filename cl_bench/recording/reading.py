"""results.json files read for the report: every run under the paths given, each file checked
and a bad one refused by name with the reason, so one bad file does not hide the rest of a sweep.

A results.json that parses but is not a well-formed run record (a config that is not one, a
score matrix that is missing, ragged, too long or holds a string, NaN or infinity) is refused
(:func:`read_run`); :func:`find_runs` can collect the refusals and go on.
"""

from __future__ import annotations

import json
import math
import numbers
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cl_bench.config import arm_name
from cl_bench.errors import ConfigError
from cl_bench.evaluation.example_forgetting import example_flips
from cl_bench.evaluation.stability_gap import curve_metrics
from cl_bench.recording.results import finite_json
from cl_bench.recording.run_results import (
    CONTINUAL_METRICS,
    METRICS,
    Refused,
    RunResult,
    new_task_score,
    result_settings,
)

#: the display names of the models this project's builders make (a hub model goes by its hub name)
BUILT_MODELS = {"load_smollm2": "SmolLM2-135M-Instruct", "tiny_llama": "tiny random Llama"}


def _model_name(model: dict) -> str:
    """The model's name, with its LoRA settings when adapters trained (never grouped with full runs)."""
    lora = model.get("lora") or {}
    suffix = (
        f"+lora(r={lora.get('r')}, alpha={lora.get('alpha')}, {','.join(lora.get('target_modules') or [])})"
        if lora.get("enabled")
        else ""
    )
    for key in ("name_or_path", "name", "path", "pretrained_model_name_or_path"):
        if model.get(key):
            return str(model[key]) + suffix
    builder = str(model.get("_target_", "?")).rsplit(".", 1)[-1]
    return BUILT_MODELS.get(builder, builder) + suffix


def _stream_name(tasks: dict, names: list[str], data: str | None) -> str:
    """The stream's loader, its data (the manifest's digest, short; for a run recorded before data
    manifests, the folder or the embedded stream's seed) and its tasks."""
    source = f"data {data[:12]}" if data else tasks.get("data_dir") or f"data_seed={tasks.get('data_seed')}"
    kind = str(tasks.get("_target_", "?")).rsplit(".", 1)[-1]
    return f"{kind}({source}; {','.join(sorted(names))})"


def _what(value: Any) -> str:
    """A JSON value as a refusal names it: null, the string 'x', a list of 3, an object, 4.5."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return repr(value)


def _is_number(value: Any) -> bool:
    """A real number JSON can hold (true and false are not numbers here)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


#: results.json's optional sections and the JSON type each must have when present
SECTIONS = {
    "cl_metrics": dict,
    "general": dict,
    "stages": list,
    "timings": dict,
    "data": dict,
    "continual": dict,
    "example_forgetting": dict,
    "kl_to_base": list,
    "learning": dict,
    "non_finite": dict,
}


def _matrix_problem(data: dict, non_finite: dict[str, str], recorded: dict[str, str]) -> str | None:
    """Why ``tasks`` and ``R`` are not a run's task list and score matrix, or None: a list of task
    names; rows of one finite score per task, at most the base row and one per stage, all of them
    when the run finished. ``non_finite``: the places that held NaN or infinity in the file (read as
    null); ``recorded``: those the run wrote as null itself (results.json's ``non_finite``)."""
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        return f"tasks is {_what(tasks)}, not a list of task names"
    if "R" not in data:
        return "it has no R (the score matrix)"
    R = data["R"]
    if not isinstance(R, list):
        return f"R is {_what(R)}, not a list of rows"
    joint = bool(data.get("joint"))
    most = 2 if joint else len(tasks) + 1
    if len(R) > most:
        trained = "a joint run has" if joint else f"a run over {len(tasks)} tasks has"
        return f"R has {len(R)} rows; {trained} at most {most} (the base row and one per stage)"
    for i, row in enumerate(R):
        if not isinstance(row, list) or len(row) != len(tasks):
            return f"R[{i}] is {_what(row)}, not one score per task ({len(tasks)})"
        for j, v in enumerate(row):
            where = f"R[{i}][{j}]"
            if where in non_finite:
                return f"{where} is {non_finite[where]}, not a finite score"
            if v is None and where in recorded:
                return f"{where} is null: it was {recorded[where]} when the run recorded it"
            if not _is_number(v):
                return f"{where} is {_what(v)}, not a score"
    if data.get("status") == "finished" and len(R) != most:
        return f"the run finished, but R has {len(R)} rows, not {most} (the base row and one per stage)"
    return None


def _continual_problem(curves: dict, tasks: list[str]) -> str | None:
    """Why results.json's ``continual`` cannot be averaged point by point, or None: steps and the
    training index side by side, and per task one score (or null) per step."""
    steps = curves.get("steps")
    if not steps:
        return None
    if not isinstance(steps, list) or not isinstance(curves.get("training"), list):
        return "continual.steps and continual.training are not lists"
    if len(curves["training"]) != len(steps):
        return f"continual has {len(steps)} steps but {len(curves['training'])} training indices"
    scores = curves.get("scores")
    if not isinstance(scores, dict):
        return f"continual.scores is {_what(scores)}, not an object"
    for task in tasks:
        points = scores.get(task)
        if not isinstance(points, list) or len(points) != len(steps):
            return f"continual.scores.{task} is {_what(points)}, not one score per step ({len(steps)})"
        if not all(v is None or _is_number(v) for v in points):
            return f"continual.scores.{task} holds a value that is not a number"
    return None


def _record_problem(data: Any, non_finite: dict[str, str]) -> str | None:
    """Why a parsed results.json is not a run's record, or None: the config and what the report
    reads from it (method, seed), the status, the sections' types, the task list and R."""
    if not isinstance(data, dict):
        return f"it holds {_what(data)}, not an object"
    config = data.get("config")
    if not isinstance(config, dict):
        return "it has no config" if config is None else f"config is {_what(config)}, not an object"
    if not isinstance(config.get("method"), dict):
        return f"config.method is {_what(config.get('method'))}, not a method's config (an object)"
    seed = config.get("seed")
    if not _is_number(seed) or not math.isfinite(seed) or seed != int(seed):
        return f"config.seed is {_what(seed)}, not an integer"
    for key in ("model", "tasks"):
        if not isinstance(config.get(key) or {}, dict):
            return f"config.{key} is {_what(config[key])}, not an object"
    if not isinstance(data.get("status"), str):
        return f"status is {_what(data.get('status'))}, not a word (finished, failed, ...)"
    for key, kind in SECTIONS.items():
        if data.get(key) is not None and not isinstance(data[key], kind):
            return f"{key} is {_what(data[key])}, not {'an object' if kind is dict else 'a list'}"
    recorded = {k: str(v) for k, v in (data.get("non_finite") or {}).items()}
    problem = _matrix_problem(data, non_finite, recorded)
    if problem is None and data.get("continual") and not data.get("joint"):
        problem = _continual_problem(data["continual"], data["tasks"])
    return problem


def learning_values(learning: dict) -> dict[str, float | None]:
    """The report's columns from an on-policy paradigm's telemetry (results.json's ``learning``):
    ``reward``, the mean over tasks of each task's mean reward (in the reward's unit), and
    ``skipped_groups``, the mean over tasks of the share (0-1) of prompt groups whose rewards were
    all equal (no signal, no gradient); None for a run without them (SFT)."""
    per_task = [t for t in (learning.get("tasks") or {}).values() if isinstance(t, dict)]

    def mean(key: str) -> float | None:
        xs = [t[key] for t in per_task if t.get(key) is not None]
        return statistics.fmean(xs) if xs else None

    return {"reward": mean("reward_mean"), "skipped_groups": mean("skipped_groups")}


def read_run(path: Path) -> RunResult:
    """A run dir (or its results.json) read; a file that is not a run's well-formed results is
    refused by name with the reason (:class:`ConfigError`). NaN and infinities are read as missing
    values: in R they refuse the run (its metrics come from R), elsewhere they are kept in
    ``non_finite`` for the report to name."""
    file = path / "results.json" if path.is_dir() else path

    def refuse(reason: str) -> ConfigError:
        return ConfigError(f"{file}: not a run's results.json ({reason})")

    try:
        parsed = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise refuse(f"{type(e).__name__}: {e}") from None
    if isinstance(parsed, dict):
        results, non_finite = finite_json({k: v for k, v in parsed.items() if k != "config"})
        data = {**results, "config": parsed.get("config")}
    else:
        data, non_finite = parsed, {}
    problem = _record_problem(data, non_finite)
    if problem is not None:
        raise refuse(problem)
    try:
        run = _run_result(file, data)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError) as e:
        raise refuse(f"malformed: {type(e).__name__}: {e}") from None
    for metric in METRICS:
        value = run.values.get(metric)
        if value is not None and not (_is_number(value) and math.isfinite(value)):
            raise refuse(f"its {metric} is {_what(value)}, not a number")
    run.non_finite = {**data.get("non_finite", {}), **non_finite}
    return run


def _run_result(file: Path, data: dict) -> RunResult:
    """The :class:`RunResult` of a results.json whose shape :func:`_record_problem` checked."""
    config = data["config"]
    method = config["method"]
    general = data.get("general") or {}
    means = general.get("mean") or {}
    stages = data.get("stages") or []
    values = dict(data.get("cl_metrics") or {})
    values["delta_RG"] = general.get("delta_RG")
    values["general_before"] = means.get("base")
    values["general_after"] = means.get(stages[-1]) if len(stages) > 1 else None
    # recomputed from the stored curves: a run recorded under an earlier rule is compared under today's
    continual = {} if data.get("joint") else curve_metrics(data.get("continual"), data["tasks"])
    values.update({m: continual.get(m) for m in CONTINUAL_METRICS})
    total = (data.get("timings") or {}).get("total_s")
    values["wall_min"] = None if total is None else total / 60
    cpu = (data.get("timings") or {}).get("cpu_s")
    values["cpu_min"] = None if cpu is None else cpu / 60
    values.update(example_flips(data.get("example_forgetting") or {}))
    joint = bool(data.get("joint"))
    values["new_task"] = None if joint else new_task_score(data["R"])
    values["kl_new"] = None if joint or not data.get("kl_to_base") else new_task_score(data["kl_to_base"])
    values.update(learning_values(data.get("learning") or {}))
    digest = (data.get("data") or {}).get("manifest_sha256")
    if digest is not None and not isinstance(digest, str):
        raise TypeError(f"data.manifest_sha256 is {_what(digest)}, not a digest")
    return RunResult(
        path=file.parent,
        status=data["status"],
        error=data.get("error"),
        method=arm_name(
            (data.get("learning") or {}).get("paradigm"), str(method.get("_target_", "?")).rsplit(".", 2)[-2]
        ),
        settings=result_settings(config, data_hashed=digest is not None),
        stream=_stream_name(config.get("tasks") or {}, data["tasks"], digest),
        order=tuple(data["tasks"]),
        model=_model_name(config.get("model") or {}),
        seed=int(config["seed"]),
        joint=joint,
        R=data["R"],
        values=values,
        continual=data.get("continual"),
        data=digest,
        unlearned={
            task: "; ".join(map(str, record["warnings"]))
            for task, record in ((data.get("learning") or {}).get("tasks") or {}).items()
            if isinstance(record, dict) and isinstance(record.get("warnings"), list) and record["warnings"]
        },
    )


def different_data(runs: list[RunResult]) -> list[str]:
    """One line per stream that finished runs read from different data (the same loader and tasks,
    another manifest digest): the report keeps them in separate settings and says so."""
    by_stream: dict[tuple, set[str]] = {}
    for r in runs:
        if r.status == "finished" and r.data:
            by_stream.setdefault((r.stream.split("(", 1)[0], tuple(sorted(r.order))), set()).add(r.data)
    return [
        f"{kind} on {', '.join(tasks)}: runs read {len(digests)} different data sets "
        f"({', '.join(sorted(d[:12] for d in digests))}); they are kept apart, never averaged"
        for (kind, tasks), digests in by_stream.items()
        if len(digests) > 1
    ]


def find_runs(paths: Iterable[str | Path], refused: list[Refused] | None = None) -> list[RunResult]:
    """Every run under ``paths`` (run dirs, multirun dirs, or results.json files), in path order.
    A file that is not a run's well-formed results is refused (:func:`read_run`): appended to
    ``refused`` when given, and the others read on; raised when not. A path that does not exist,
    or paths with no results.json at all, are refused either way."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif (p / "results.json").is_file():
            files.append(p / "results.json")
        elif p.is_dir():
            files.extend(sorted(p.rglob("results.json")))
        else:
            raise ConfigError(f"{p}: no such run or sweep dir")
    if not files:
        raise ConfigError(f"no results.json under {', '.join(map(str, paths))}")
    runs = []
    for f in files:
        try:
            runs.append(read_run(f))
        except ConfigError as e:
            if refused is None:
                raise
            refused.append(Refused(f, str(e).removeprefix(f"{f}: ")))
    return runs
