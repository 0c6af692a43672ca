"""Run results on disk: ``results.json`` and ``scores.csv``, rewritten atomically after every stage.

A crash at any point leaves the last complete version of both files; ``status`` says whether the
run finished, is still running, or failed (with the error). Every JSON file is strict JSON: a
value that is not a finite number (NaN, an infinity) is written as null, and results.json's
``non_finite`` says where each was and what it was (:func:`finite_json`), so any JSON reader reads
the file and no reader takes a null for a missing measurement unawares.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

from cl_bench.data.options import answer_options
from cl_bench.evaluation.continual import ContinualSettings
from cl_bench.evaluation.example_forgetting import example_flips, flips
from cl_bench.evaluation.general_ability import PROBE_TASK
from cl_bench.evaluation.matrix_metrics import all_metrics
from cl_bench.evaluation.stability_gap import curve_metrics
from cl_bench.files import atomic_write
from cl_bench.secrets import redact


def finite_json(obj: Any, where: str = "") -> tuple[Any, dict[str, str]]:
    """A copy of a JSON tree with every float that is not finite (NaN, +-inf: not JSON) replaced
    by None, and where each was (``R[2][0]``, ``cl_metrics.op``) with what it was (``nan``, ``inf``):
    what ``json.dumps(..., allow_nan=False)`` writes, with the reason kept beside it."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, {where: repr(obj)}
    found: dict[str, str] = {}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out[k], inner = finite_json(v, f"{where}.{k}" if where else str(k))
            found.update(inner)
        return out, found
    if isinstance(obj, (list, tuple)):
        items = []
        for i, v in enumerate(obj):
            item, inner = finite_json(v, f"{where}[{i}]")
            items.append(item)
            found.update(inner)
        return items, found
    return obj, found


def strict_json(obj: Any, **kwargs: Any) -> str:
    """``obj`` as strict JSON text (``allow_nan=False``); a non-finite number in it is a bug of the
    caller, which cleans its values with :func:`finite_json` first (it raises ValueError)."""
    return json.dumps(obj, allow_nan=False, **kwargs)


class RunRecorder:
    """Collects the score matrix and timings of a run and writes them after every stage."""

    def __init__(
        self,
        out_dir: str | Path,
        config: dict,
        task_names: list[str],
        metric_names: list[str],
        writes: bool = True,
        trained: list[str] | None = None,
        continual: ContinualSettings | None = None,
        data: dict[str, Any] | None = None,
        options: dict[str, int | float | None] | None = None,
    ):
        """``writes=False`` keeps everything in memory (the processes other than rank 0).
        ``trained``: what each stage trains, when it is not one task of the stream after another
        (a joint run: ``["joint"]``, one row after the base row). ``continual``: the run's continual
        evaluation, whose points :meth:`add_continual` collects. ``data``: the stream's data manifest
        (cl_bench/data/manifest.py, ``stream_data``), results.json's ``data``. ``options``: each task's
        number of answer options for its flips' chance adjustment (cl_bench/evaluation/example_forgetting.py,
        ``stream_options``); a task it lacks gets the distinct answers of its evaluated examples."""
        self.out_dir = Path(out_dir)
        self.writes = writes
        if writes:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.config = redact(config)
        self.task_names = task_names
        self.metric_names = metric_names
        self.trained = list(task_names) if trained is None else list(trained)
        #: a multi-task reference run: R has the base row and one trained row
        self.joint = self.trained != list(task_names)
        self.R: list[list[float]] = []
        self.timings: dict[str, Any] = {"train_s": [], "eval_s": []}
        self.status = "running"
        self.error: str | None = None
        self.started = time.time()
        #: CPU seconds of this process at the start (a resumed run adds the CPU time it had spent;
        #: None when a checkpoint from before this was recorded leaves it unknown)
        self.cpu_started: float | None = time.process_time()
        #: general-ability scores (0-100) per benchmark, by the stage they were taken at
        self.general: dict[str, dict[str, float]] = {}
        self.continual = continual or ContinualSettings()
        #: continual-evaluation points: {"step", "training" (task index), "scores": {task: score}, "seconds"}
        self.points: list[dict[str, Any]] = []
        #: the method's own account of the run (CLMethod.report), results.json's ``method``
        self.method_report: dict[str, Any] = {}
        #: eval.kl_to_base: per stage, each task's per-token KL(base || model) (cl_bench/evaluation/base_kl.py)
        self.kl_to_base: list[list[float]] = []
        #: the learning paradigm's telemetry (GRPO, self-SFT; empty for SFT): results.json's ``learning``
        self.learning_report: dict[str, Any] = {}
        self.data = data
        self.options = dict(options or {})
        #: per stage, the scores of the metrics recorded beside each task's own (TaskSpec.also):
        #: {metric: {task: score}}
        self.also: list[dict[str, dict[str, float]]] = []

    @property
    def stages(self) -> list[str]:
        return ["base"] + [f"after_{name}" for name in self.trained[: len(self.R) - 1]]

    def cl_metrics(self) -> dict[str, float | None]:
        """The CL metrics of R; a joint run has no sequence: only OP (the mean of its trained row)."""
        if len(self.R) < 2:
            return {}
        if self.joint:
            return {"op": sum(self.R[-1]) / len(self.R[-1])}
        return all_metrics(self.R)

    def add_continual(self, points: list[dict[str, Any]]) -> None:
        """The continual-evaluation points of the task just trained."""
        self.points.extend(points)

    def continual_curves(self) -> dict[str, Any] | None:
        """results.json's ``continual``: the settings and, per point, its step, the index of the
        task in training, and every task's score (None before the task was seen)."""
        if not self.continual.enabled:
            return None
        return {
            "every_n_steps": self.continual.every_n_steps,
            "max_examples": self.continual.max_examples,
            "measures": self.continual.measures,
            "windows": list(self.continual.windows),
            "before_first_step": self.continual.before_first_step,
            "resample": self.continual.resample,
            "steps": [p["step"] for p in self.points],
            "training": [p["training"] for p in self.points],
            "seconds": [p.get("seconds") for p in self.points],
            "scores": {n: [p["scores"].get(n) for p in self.points] for n in self.task_names},
        }

    def continual_metrics(self) -> dict[str, Any]:
        """min-ACC, avg-min-ACC, WC-ACC and WF^w of the points so far (none for a joint run, which
        has no sequence); see cl_bench/evaluation/stability_gap.py (``curve_metrics``)."""
        return {} if self.joint else curve_metrics(self.continual_curves(), self.task_names)

    def stage_metrics(self) -> dict[str, float]:
        """What the loggers get after the latest stage: each task's score, the CL metrics, the
        continual metrics' averages, general ability when it was taken, each trained task's
        per-example flips (``examples/<task>/forgotten``, ...) and their means (``cl/ex_forgotten``,
        ``cl/ex_gained``, in %), and the stage's number."""
        stage = self.stages[-1]
        metrics = {f"score/{name}": v for name, v in zip(self.task_names, self.R[-1])}
        metrics.update({f"cl/{k}": v for k, v in self.cl_metrics().items()})
        metrics.update({f"cl/{k}": v for k, v in self.continual_metrics().items() if not isinstance(v, dict)})
        if stage in self.general:
            metrics.update({f"general/{k}": v for k, v in self.general[stage].items()})
            metrics["general/mean"] = self.general_mean(stage)
            if self.general_delta() is not None:
                metrics["general/delta_RG"] = self.general_delta()
        if self.writes and not self.joint:
            flips = self.example_forgetting()
            for task, f in flips.items():
                metrics.update({f"examples/{task}/{k}": v for k, v in f.items() if isinstance(v, float)})
            metrics.update({f"cl/{k}": v for k, v in example_flips(flips).items() if v is not None})
        metrics["stage"] = len(self.R) - 1
        return metrics

    def add_row(self, scores: list[float], eval_s: float, also: dict[str, dict[str, float]] | None = None) -> None:
        """The latest stage's scores (R's next row), its evaluation time, and the scores of the
        metrics recorded beside the tasks' own (``{metric: {task: score}}``)."""
        self.R.append([float(s) for s in scores])
        self.timings["eval_s"].append(round(eval_s, 3))
        self.also.append(also or {})

    def also_matrices(self) -> dict[str, list[list[float | None]]]:
        """results.json's ``also``: per metric recorded beside the tasks' own, a matrix shaped as R
        (None where a task does not record it)."""
        names = sorted({m for row in self.also for m in row})
        return {m: [[row.get(m, {}).get(t) for t in self.task_names] for row in self.also] for m in names}

    def add_general(self, scores: dict[str, float], seconds: float | None = None) -> None:
        """General-ability scores taken at the latest stage (and the seconds they took)."""
        self.general[self.stages[-1]] = {k: float(v) for k, v in scores.items()}
        if seconds is not None:
            self.timings.setdefault("general_s", []).append(round(seconds, 3))

    def general_benchmarks(self, scores: dict[str, float]) -> list[str]:
        """The benchmarks the summaries average: all, less the offline probe when others ran too
        (TRACE's six, say), so that the numbers compare with the papers'."""
        others = [k for k in scores if k != PROBE_TASK]
        return others or list(scores)

    def general_mean(self, stage: str) -> float | None:
        """The plain mean of the benchmarks' scores at ``stage`` (FGGM's "General")."""
        if stage not in self.general:
            return None
        names = self.general_benchmarks(self.general[stage])
        return sum(self.general[stage][k] for k in names) / len(names)

    def general_delta(self) -> float | None:
        """delta R^G: mean over the benchmarks of (latest - base); None until both exist."""
        stages = [s for s in self.stages if s in self.general]
        if len(stages) < 2 or stages[0] != "base":
            return None
        base, last = self.general["base"], self.general[stages[-1]]
        names = self.general_benchmarks(base)
        return sum(last[k] - base[k] for k in names) / len(names)

    def add_train_time(self, seconds: float) -> None:
        self.timings["train_s"].append(round(seconds, 3))

    def set_timing(self, key: str, seconds: float) -> None:
        self.timings[key] = round(seconds, 3)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on recording (checkpoints carry it)."""
        return {
            "R": self.R,
            "timings": self.timings,
            "general": self.general,
            "points": self.points,
            "also": self.also,
            "kl_to_base": self.kl_to_base,
            "elapsed_s": time.time() - self.started,
            "cpu_s": self.cpu_seconds(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.R, self.timings, self.general = state["R"], state["timings"], state["general"]
        self.points = state.get("points", [])
        self.also = state.get("also", [{} for _ in self.R])
        self.kl_to_base = state.get("kl_to_base", [])
        self.started = time.time() - state["elapsed_s"]
        spent = state.get("cpu_s")
        self.cpu_started = None if spent is None else time.process_time() - spent

    def cpu_seconds(self) -> float | None:
        return None if self.cpu_started is None else time.process_time() - self.cpu_started

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "error": self.error,
            "joint": self.joint,
            "tasks": self.task_names,
            "metrics": self.metric_names,
            "stages": self.stages,
            "R": self.R,
            **({"also": self.also_matrices()} if any(self.also) else {}),
            **({"kl_to_base": self.kl_to_base} if self.kl_to_base else {}),
            "cl_metrics": self.cl_metrics(),
            **({"example_forgetting": self.example_forgetting()} if self.writes and not self.joint else {}),
            "general": {
                "scores": self.general,
                "delta_RG": self.general_delta(),
                "mean": {stage: self.general_mean(stage) for stage in self.general},
            },
            **(
                {"continual": self.continual_curves(), "continual_metrics": self.continual_metrics()}
                if self.continual.enabled
                else {}
            ),
            **({"method": self.method_report} if self.method_report else {}),
            **({"learning": self.learning_report} if self.learning_report else {}),
            "timings": {
                **self.timings,
                "total_s": round(time.time() - self.started, 3),
                "cpu_s": None if self.cpu_started is None else round(self.cpu_seconds(), 3),
                **(
                    {"continual_s": round(sum(p.get("seconds") or 0 for p in self.points), 3)}
                    if self.continual.enabled
                    else {}
                ),
            },
            "data": self.data,
            "config": self.config,
        }

    def example_forgetting(self) -> dict[str, dict]:
        """Per trained task, its examples' flips from the stage right after it was trained to the
        latest stage (cl_bench/evaluation/example_forgetting.py), read from the predictions files;
        empty until a later stage exists."""
        folder = self.out_dir / "predictions"
        latest = folder / f"{self.stages[-1]}.json" if self.stages else None
        if latest is None or not latest.is_file():
            return {}
        now = json.loads(latest.read_text())
        out = {}
        for task in self.trained:
            trained = folder / f"after_{task}.json"
            if trained == latest or not trained.is_file() or task not in now:
                continue
            then = json.loads(trained.read_text())[task]
            if any("right" not in r for r in then + now[task]):
                continue  # written before per-example results were kept
            options = self.options[task] if task in self.options else answer_options([r["answer"] for r in then])
            out[task] = flips([r["right"] for r in then], [r["right"] for r in now[task]], options)
        return out

    def scores_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["stage"] + self.task_names)
        for stage, row in zip(self.stages, self.R):
            writer.writerow([stage] + [f"{v:.4f}" for v in row])
        return buf.getvalue()

    def write_predictions(
        self, answers: dict[str, list[str]], predictions: dict[str, list[str]], right: dict[str, list[bool]]
    ) -> None:
        """``predictions/<stage>.json`` for the latest row: per task, the reference and generated
        answers, and whether each is right (cl_bench/evaluation/example_forgetting.py)."""
        if not self.writes:
            return
        records = {
            task: [{"answer": a, "prediction": p, "right": r} for a, p, r in zip(answers[task], preds, right[task])]
            for task, preds in predictions.items()
        }
        atomic_write(
            self.out_dir / "predictions" / f"{self.stages[-1]}.json",
            strict_json(records, ensure_ascii=False, indent=1),
        )

    def write(self, status: str | None = None, error: str | None = None) -> None:
        """results.json and scores.csv, atomically. A status given (the run's last word: finished,
        failed, stopped) is written over the old results.json in place if the disk has no room for
        a new file, so that a run that filled its disk still says it failed."""
        if status is not None:
            self.status = status
        if error is not None:
            self.error = error
        if not self.writes:
            return
        record, non_finite = finite_json(self.to_dict())
        if non_finite:  # beside status and error: a reader sees first that some values were not numbers
            record = {"status": record["status"], "error": record["error"], "non_finite": non_finite, **record}
        last = status is not None  # the run's last word: written in place if need be
        atomic_write(self.out_dir / "results.json", strict_json(record, indent=2), in_place_when_full=last)
        atomic_write(self.out_dir / "scores.csv", self.scores_csv(), in_place_when_full=last)
