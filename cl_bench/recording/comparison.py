"""Runs compared: read results.json files, group runs that differ only by seed, aggregate, pair.

A *group* is the runs whose resolved configs are equal but for the seed and the settings that
cannot change a result (:data:`NOT_RESULT_KEYS`: paths, loggers, checkpointing, names): true
repeats. Its label names the method and every setting in which that method's runs differ
(learning rate, epochs, batch, trainer, ... as well as the method's own), so runs that differ in
anything else are never averaged; a group that holds one seed twice is refused, naming both run
dirs. Each row lists its run dirs. A *paired* comparison takes, for each seed (and order) that a method and the
baseline both ran, the difference of a metric, and gives its mean with a percentile-bootstrap 95%
interval (seeded, so a report is reproducible).
"""

from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_bench.config import current_settings, flat_settings
from cl_bench.errors import ConfigError
from cl_bench.evaluation.example_forgetting import example_flips
from cl_bench.evaluation.stability_gap import curve_metrics

#: the numbers a group is summarised by: key -> how to read it from a results.json
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
    "wall_min",
    "cpu_min",
)
#: what a run cost, not what it achieved: summarised, never paired
TIMINGS = ("wall_min", "cpu_min")
#: the continual-evaluation metrics (results.json's continual_metrics; only runs with eval.continual)
CONTINUAL_METRICS = ("avg_min_acc", "wc_acc", "wf10")
#: per-example flips (results.json's example_forgetting; runs recorded before it have none)
EXAMPLE_METRICS = ("ex_forgotten", "ex_gained")
#: the KL to the base model on each task just learned (results.json's kl_to_base; runs with eval.kl_to_base)
KL_METRICS = ("kl_new",)


def new_task_score(R: list[list[float]]) -> float | None:
    """Each task's score right after it was trained, averaged (mean of R[t+1][t]; the plasticity a
    method's forgetting is traded against); None before a task is trained."""
    diagonal = [R[t + 1][t] for t in range(min(len(R) - 1, len(R[0]) if R else 0))]
    return sum(diagonal) / len(diagonal) if diagonal else None


def paradigm_label(method: str, paradigm: str | None) -> str:
    """A run's name in reports: the method under SFT ("ewc"), the paradigm for plain SFT's method
    learned another way ("grpo"), else both ("grpo+ewc")."""
    if paradigm in (None, "sft"):
        return method
    return paradigm if method == "sft" else f"{paradigm}+{method}"


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


def read_run(path: Path) -> RunResult:
    """A run dir (or its results.json) read; a file that is not a run's results is refused by name."""
    file = path / "results.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
        config = data["config"]
        method = config["method"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{file}: not a run's results.json ({type(e).__name__}: {e})") from None
    general = data.get("general") or {}
    means = general.get("mean") or {}
    stages = data.get("stages") or []
    values = dict(data.get("cl_metrics") or {})
    values["delta_RG"] = general.get("delta_RG")
    values["general_before"] = means.get("base")
    values["general_after"] = means.get(stages[-1]) if len(stages) > 1 else None
    # recomputed from the stored curves: a run recorded under an earlier rule is compared under today's
    continual = {} if data.get("joint") else curve_metrics(data.get("continual"), data.get("tasks") or [])
    values.update({m: continual.get(m) for m in CONTINUAL_METRICS})
    total = (data.get("timings") or {}).get("total_s")
    values["wall_min"] = None if total is None else total / 60
    cpu = (data.get("timings") or {}).get("cpu_s")
    values["cpu_min"] = None if cpu is None else cpu / 60
    values.update(example_flips(data.get("example_forgetting") or {}))
    joint = bool(data.get("joint"))
    values["new_task"] = None if joint else new_task_score(data.get("R") or [])
    values["kl_new"] = None if joint or not data.get("kl_to_base") else new_task_score(data["kl_to_base"])
    digest = (data.get("data") or {}).get("manifest_sha256")
    return RunResult(
        path=file.parent,
        status=data.get("status", "?"),
        error=data.get("error"),
        method=paradigm_label(
            str(method.get("_target_", "?")).rsplit(".", 2)[-2], (data.get("learning") or {}).get("paradigm")
        ),
        settings=result_settings(config, data_hashed=digest is not None),
        stream=_stream_name(config.get("tasks") or {}, data.get("tasks") or [], digest),
        order=tuple(data.get("tasks") or ()),
        model=_model_name(config.get("model") or {}),
        seed=config.get("seed"),
        joint=joint,
        R=data.get("R") or [],
        values=values,
        continual=data.get("continual"),
        data=digest,
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


def find_runs(paths: Iterable[str | Path]) -> list[RunResult]:
    """Every run under ``paths`` (run dirs, multirun dirs, or results.json files), in path order."""
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
    return [read_run(f) for f in files]


def _label(run: RunResult, varying: list[str]) -> str:
    name = run.method + (" (joint)" if run.joint else "")
    extra = ", ".join(f"{k.removeprefix('method.')}={run.settings.get(k)}" for k in varying)
    return f"{name} [{extra}]" if extra else name


def separating_keys(runs: list[RunResult]) -> dict[str, list[str]]:
    """Per method, the result settings in which its runs differ (what separates its groups)."""
    varying: dict[str, list[str]] = {}
    for method in sorted({r.method for r in runs}):
        mine = [r for r in runs if r.method == method]
        keys = sorted({k for r in mine for k in r.settings})
        varying[method] = [k for k in keys if len({json.dumps(r.settings.get(k), sort_keys=True) for r in mine}) > 1]
    return varying


def group_runs(runs: list[RunResult]) -> dict[tuple[str, str, tuple, str], list[RunResult]]:
    """Finished runs by (label, stream, order, model), each group the repeats of one experiment
    (equal result settings, see :func:`result_settings`); a label names the method and the
    settings in which that method's runs differ. The same seed twice in a group is refused."""
    finished = [r for r in runs if r.status == "finished"]
    by_setting: dict[tuple, list[RunResult]] = {}
    for r in finished:  # a label separates a method's runs within one setting, not across streams
        by_setting.setdefault((r.stream, r.order, r.model), []).append(r)
    groups: dict[tuple, list[RunResult]] = {}
    for setting, members in by_setting.items():
        varying = separating_keys(members)
        for r in members:
            groups.setdefault((_label(r, varying[r.method]), *setting), []).append(r)
    for key, members in groups.items():
        seen: dict[Any, RunResult] = {}
        for r in members:
            if r.seed in seen:
                raise ConfigError(
                    f"{seen[r.seed].path} and {r.path}: two runs of the same settings and seed {r.seed} "
                    f"({key[0]}); a report averages repeats over seeds: leave one of them out"
                )
            seen[r.seed] = r
    return groups


def summary_stats(values: list[float | None]) -> dict[str, float | int | None]:
    """mean, sample std (n - 1; None for one value) and n of the values that exist."""
    xs = [v for v in values if v is not None]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else None, "n": len(xs)}


def aggregate(groups: dict[tuple, list[RunResult]]) -> list[dict[str, Any]]:
    """One row per group: its key, seeds, and mean/std/n of every metric."""
    rows = []
    for (label, stream, order, model), runs in groups.items():
        row = {
            "method": label,
            "stream": stream,
            "order": list(order),
            "model": model,
            "seeds": sorted(r.seed for r in runs),
            "runs": [str(r.path) for r in runs],
        }
        for m in METRICS:
            row[m] = summary_stats([r.values.get(m) for r in runs])
        rows.append(row)
    return rows


def bootstrap_interval(diffs: list[float], seed: int = 0, resamples: int = 10_000) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of ``diffs`` (deterministic given ``seed``)."""
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(rng.choices(diffs, k=n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[min(resamples - 1, math.ceil(0.975 * resamples) - 1)]


def paired(groups: dict[tuple, list[RunResult]], baseline: str, seed: int = 0) -> list[dict[str, Any]]:
    """For each group beside the baseline's on the same stream, order and model: per metric, the
    mean difference (method - baseline) over the seeds both ran, with its bootstrap interval."""
    out = []
    for (label, stream, order, model), runs in groups.items():
        base = groups.get((baseline, stream, order, model))
        if base is None or label == baseline:
            continue
        by_seed = {r.seed: r for r in base}
        pairs = [(r, by_seed[r.seed]) for r in runs if r.seed in by_seed]
        mine = {r.seed for r in runs}
        row = {
            "method": label,
            "baseline": baseline,
            "stream": stream,
            "order": list(order),
            "model": model,
            "seeds": sorted(r.seed for r, _ in pairs),
            # seeds only one side ran: left out of the pairs, and said so in every output
            "unpaired_seeds": {label: sorted(mine - set(by_seed)), baseline: sorted(set(by_seed) - mine)},
        }
        for m in (m for m in METRICS if m not in TIMINGS):
            diffs = [
                a.values[m] - b.values[m]
                for a, b in pairs
                if a.values.get(m) is not None and b.values.get(m) is not None
            ]
            row[m] = (
                None
                if not diffs
                else {
                    "diff": statistics.fmean(diffs),
                    "n": len(diffs),
                    "ci95": list(bootstrap_interval(diffs, seed)) if len(diffs) > 1 else None,
                }
            )
        out.append(row)
    return out


def mean_matrix(runs: list[RunResult]) -> list[list[float]]:
    """The element-wise mean score matrix R of runs of one group."""
    rows, cols = len(runs[0].R), len(runs[0].R[0])
    return [[statistics.fmean(r.R[i][j] for r in runs) for j in range(cols)] for i in range(rows)]


def mean_curves(runs: list[RunResult]) -> dict[str, Any] | None:
    """The continual-evaluation curves of a group averaged over its runs, point by point: steps,
    training index, per task the mean score (None where no run scored it) and the measures. Only
    runs whose points fall on the same steps are averaged (the first run's); None without curves."""
    curves = [r.continual for r in runs if r.continual and r.continual.get("steps")]
    if not curves:
        return None
    first = curves[0]
    same = [c for c in curves if c["steps"] == first["steps"]]
    scores = {}
    for task in first["scores"]:
        columns = zip(*(c["scores"][task] for c in same))
        scores[task] = [None if any(v is None for v in col) else statistics.fmean(col) for col in columns]
    return {
        "steps": first["steps"],
        "training": first["training"],
        "scores": scores,
        "measures": first.get("measures", {}),
        "n": len(same),
    }
