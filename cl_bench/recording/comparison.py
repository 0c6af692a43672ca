"""Runs compared: group runs that differ only by seed, aggregate, pair.

A *group* is the runs whose resolved configs are equal but for the seed and the settings that
cannot change a result (:data:`~cl_bench.recording.run_results.NOT_RESULT_KEYS`: paths, loggers,
checkpointing, names): true repeats. Its label names the method and every setting in which that
method's runs differ (learning rate, epochs, batch, trainer, ... as well as the method's own), so
runs that differ in anything else are never averaged; a group that holds one seed twice is refused,
naming both run dirs. Each row lists its run dirs. A *paired* comparison takes, for each seed (and
order) that a method and the baseline both ran, the difference of a metric, and gives its mean with
a 95% interval that says what it is (:func:`~cl_bench.recording.intervals.paired_interval`).
"""

from __future__ import annotations

import json
import statistics
from typing import Any

from cl_bench.errors import ConfigError
from cl_bench.recording.intervals import paired_interval
from cl_bench.recording.run_results import METRICS, TIMINGS, RunResult


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


def paired(groups: dict[tuple, list[RunResult]], baseline: str, seed: int = 0) -> list[dict[str, Any]]:
    """For each group beside the baseline's on the same stream, order and model: per metric, the
    mean difference (method - baseline) over the seeds both ran, with its 95% interval and the
    interval's kind (:func:`paired_interval`: "t", "bootstrap", or None for one pair)."""
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
            kind, ci = paired_interval(diffs, seed)
            row[m] = (
                None if not diffs else {"diff": statistics.fmean(diffs), "n": len(diffs), "ci95": ci, "interval": kind}
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
