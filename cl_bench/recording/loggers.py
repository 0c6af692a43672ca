"""Experiment loggers: Lightning loggers built from ``conf/logger``, fed by the runner.

The runner owns the loggers (the per-task Trainers get ``logger=False``), so one logger spans the
whole stream: training curves use a step that runs on across tasks, and the per-stage scores, CL
metrics and the score matrix are logged after every task.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Sequence

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from cl_bench.errors import check_choice
from cl_bench.files import atomic_write


def wandb_logger(
    project: str,
    save_dir: str,
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    entity: str | None = None,
    mode: str = "auto",
    job_type: str | None = None,
    run_id: str | None = None,
) -> WandbLogger:
    """A W&B logger; ``mode: auto`` goes online only when an API key is configured, else offline.

    Offline runs land in ``<save_dir>/wandb/offline-run-*``; ``wandb sync`` uploads them later.
    The API key is read by wandb itself from the environment or netrc and is never put in a config.
    Runs of one sweep share ``group``; ``job_type`` (the method) splits them inside it, so the W&B
    UI shows each method's mean and spread over seeds. ``run_id`` continues an existing run (resume).
    """
    check_choice(mode, ("auto", "online", "offline"), "logger.wandb.mode")
    if mode == "auto":
        has_key = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_wandb()
        mode = os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        project=project, name=name, group=group, tags=list(tags), entity=entity, job_type=job_type,
        save_dir=save_dir, offline=(mode == "offline"),
        **({"id": run_id, "resume": "allow"} if run_id else {}),
    )


def _netrc_has_wandb() -> bool:
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in path.read_text()
    except OSError:
        return False


#: metric prefixes logged once per stage, plotted against the stage in W&B
STAGE_METRICS = ("score", "cl", "general")


class RunLoggers:
    """Fans metrics, the config and tables out to every configured logger."""

    def __init__(self, loggers: dict[str, Logger] | None = None):
        """``loggers`` by their key under ``logger`` in the config (``csv``, ``wandb``, ...).

        W&B runs plot the per-stage metrics (``score/*``, ``cl/*``, ``general/*``) against the
        stage, and training curves against the stream step (Lightning's ``trainer/global_step``)."""
        self.by_key = dict(loggers or {})
        self.loggers = list(self.by_key.values())
        for lg in self.wandb():
            lg.experiment.define_metric("stage")
            for prefix in STAGE_METRICS:
                lg.experiment.define_metric(f"{prefix}/*", step_metric="stage")

    def wandb(self) -> list[WandbLogger]:
        return [lg for lg in self.loggers if isinstance(lg, WandbLogger)]

    def run_ids(self) -> dict[str, str]:
        """The W&B run id of each W&B logger, by key: a resumed run logs to the same run."""
        return {k: lg.version for k, lg in self.by_key.items() if isinstance(lg, WandbLogger) and lg.version}

    def continue_from(self, step: int, stage_key: str = "stage") -> None:
        """A resumed run that goes on training at ``step``: keep what the CSV loggers recorded before
        it, and the stage rows (those with ``stage_key``) at it, which the resumed run does not log
        again (Lightning's CSV writer would delete metrics.csv); W&B continues its run id by itself."""
        for lg in self.loggers:
            if not isinstance(lg, CSVLogger):
                continue
            path = Path(lg.log_dir) / "metrics.csv"
            # a copy first: ``lg.experiment`` deletes metrics.csv when it opens, and a kill before the
            # rows are written back must not lose them (the next resume reads the copy)
            kept = path.with_name(path.name + ".before-resume")
            if path.is_file() and not kept.is_file():
                atomic_write(kept, path.read_text())
            rows = list(csv.DictReader(kept.open(newline=""))) if kept.is_file() else []
            for row in rows:
                values = {k: float(v) for k, v in row.items() if k != "step" and v not in ("", None)}
                row_step = int(float(row["step"]))
                if values and (row_step < step or (row_step == step and stage_key in values)):
                    lg.experiment.log_metrics(values, row_step)
            lg.save()
            kept.unlink(missing_ok=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        for lg in self.loggers:
            lg.log_metrics(clean, step=step)

    def log_config(self, config: dict[str, Any]) -> None:
        for lg in self.loggers:
            lg.log_hyperparams(config)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A table (the score matrix) for the loggers that have tables (W&B)."""
        for lg in self.loggers:
            if hasattr(lg, "log_table"):
                lg.log_table(key=key, columns=columns, data=rows, step=step)

    def summarize(self, values: dict[str, float | str | None]) -> None:
        """Run summary values (W&B's runs table sorts and groups by them)."""
        clean = {k: v for k, v in values.items() if v is not None}
        for lg in self.wandb():
            lg.experiment.summary.update(clean)

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        """An image file (the score-matrix heatmap) for the loggers that take images (W&B)."""
        for lg in self.wandb():
            lg.log_image(key=key, images=[str(path)], step=step)

    def log_comparison(self, recorder, png: Path, title: str, step: int) -> None:
        """W&B: a run's CL metrics and general scores as summary values (the runs table sorts by
        them) and its score matrix as a heatmap image (written to ``png`` too). No-op without W&B."""
        if not self.wandb():
            return
        from cl_bench.recording.report import score_matrix_png  # matplotlib only where W&B logs
        atomic_write(png, score_matrix_png(recorder.R, recorder.task_names, recorder.stages, title))
        self.log_image("R_heatmap", png, step)
        general = {f"general/mean_{stage}": recorder.general_mean(stage) for stage in recorder.general}
        continual = {f"cl/{k}": v for k, v in recorder.continual_metrics().items() if not isinstance(v, dict)}
        self.summarize({**{f"cl/{k}": v for k, v in recorder.cl_metrics().items()}, **continual,
                        "general/delta_RG": recorder.general_delta(), **general, "stage": len(recorder.R) - 1})

    def save(self) -> None:
        for lg in self.loggers:
            lg.save()

    def finalize(self, status: str) -> None:
        for lg in self.loggers:
            lg.finalize(status)
        for lg in self.loggers:
            experiment = getattr(lg, "_experiment", None)
            if isinstance(lg, WandbLogger) and experiment is not None:
                experiment.finish(exit_code=0 if status == "success" else 1)
