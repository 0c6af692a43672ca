"""Experiment loggers: Lightning loggers built from ``conf/logger``, fed by the runner.

The runner owns the loggers (the per-task Trainers get ``logger=False``), so one logger spans the
whole stream: training curves use a step that runs on across tasks, and the per-stage scores, CL
metrics and the score matrix are logged after every task.
"""

from __future__ import annotations

import contextlib
import csv
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

from cl_bench.errors import ConfigError, check_choice, check_number
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
    login_timeout: float = 30,
) -> WandbLogger:
    """A W&B logger; ``mode: auto`` goes online only when an API key is configured, else offline.

    Offline runs land in ``<save_dir>/wandb/offline-run-*``; ``wandb sync`` uploads them later.
    The API key is read by wandb itself from the environment or netrc and is never put in a config.
    Runs of one sweep share ``group``; ``job_type`` (the method, with the learning paradigm when it
    is not SFT: ``grpo+ewc``) splits them inside it, so the W&B UI shows each method's mean and
    spread over seeds. ``run_id`` continues an existing run (resume).
    Online, the key is checked first (``login_timeout`` seconds for the server's answer).
    """
    check_choice(mode, ("auto", "online", "offline"), "logger.wandb.mode")
    check_number(login_timeout, "logger.wandb.login_timeout", low=0, low_open=True)
    if mode == "auto":
        has_key = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_wandb()
        mode = os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")
    if mode == "online":
        check_wandb_login(login_timeout)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(
        project=project,
        name=name,
        group=group,
        tags=list(tags),
        entity=entity,
        job_type=job_type,
        save_dir=save_dir,
        offline=(mode == "offline"),
        **({"id": run_id, "resume": "allow"} if run_id else {}),
    )
    logger._wandb_init.pop("anonymous", None)  # Lightning always passes it; wandb warns it is deprecated
    return logger


def check_wandb_login(timeout: float) -> None:
    """The API key, checked with the W&B server before anything loads: a wrong key or an unreachable
    server is one ConfigError that says how to log offline instead."""
    import wandb

    offline = (
        "or log offline with logger.wandb.mode=offline and upload later with `wandb sync <run dir>/wandb/offline-run-*`"
    )
    try:
        logged_in = wandb.login(verify=True, timeout=timeout)
    except wandb.errors.CommError as e:  # AuthenticationError: the key refused, or no answer in time
        raise ConfigError(
            f"logger.wandb: W&B did not accept the login ({e}); fix WANDB_API_KEY (or ~/.netrc), {offline}"
        ) from None
    if not logged_in:  # no key, or W&B set to offline in this process (WANDB_MODE)
        raise ConfigError(
            f"logger.wandb: mode online, but W&B is not logged in (`wandb login` or WANDB_API_KEY), {offline}"
        )


@contextlib.contextmanager
def redacted_argv() -> Iterator[None]:
    """``sys.argv`` with secret-looking overrides hidden while W&B starts a run: it records the
    command line (its ``args``), and ``+api_token=...`` must not reach W&B's files or servers."""
    from cl_bench.secrets import redact_override

    given = sys.argv[:]
    sys.argv[:] = [redact_override(a) for a in given]
    try:
        yield
    finally:
        sys.argv[:] = given


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
        self.config: dict[str, Any] | None = None
        self.loggers = list(self.by_key.values())
        for lg in self.wandb():
            with redacted_argv():  # the W&B run starts here, recording the command line
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
        self.config = config  # TensorBoard's HParams get it again with the results (:meth:`finalize`)
        for lg in self.loggers:
            lg.log_hyperparams(config)

    def tensorboard(self) -> list[TensorBoardLogger]:
        return [lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)]

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A table (the score matrix): W&B's table, TensorBoard's text (a Markdown table)."""
        for lg in self.loggers:
            if hasattr(lg, "log_table"):
                lg.log_table(key=key, columns=columns, data=rows, step=step)
        for lg in self.tensorboard():
            cell = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
            lines = [columns, ["---"] * len(columns), *[[cell(v) for v in row] for row in rows]]
            lg.experiment.add_text(key, "\n".join("| " + " | ".join(line) + " |" for line in lines), step)

    def summarize(self, values: dict[str, float | str | None]) -> None:
        """Run summary values (W&B's runs table sorts and groups by them)."""
        clean = {k: v for k, v in values.items() if v is not None}
        for lg in self.wandb():
            lg.experiment.summary.update(clean)

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        """An image file (the score-matrix heatmap) for the loggers that take images (W&B)."""
        for lg in self.wandb():
            lg.log_image(key=key, images=[str(path)], step=step)

    def log_stage(self, recorder, step: int, png: Path, title: str) -> None:
        """A finished stage: its scores and CL metrics, the score matrix as a table, W&B's summary
        and heatmap (:meth:`log_comparison`); then everything is flushed."""
        self.log_metrics(recorder.stage_metrics(), step)
        self.log_table(
            "R", ["stage"] + recorder.task_names, [[s] + r for s, r in zip(recorder.stages, recorder.R)], step
        )
        self.log_comparison(recorder, png, title, step)
        self.save()

    def log_comparison(self, recorder, png: Path, title: str, step: int) -> None:
        """The score matrix as a heatmap image (written to ``png`` too) for W&B and TensorBoard; W&B
        also gets the CL metrics and general scores as summary values (its runs table sorts by them).
        No-op without either."""
        if not self.wandb() and not self.tensorboard():
            return
        from cl_bench.recording.figures import score_matrix_png  # matplotlib only where W&B or TensorBoard log

        atomic_write(png, score_matrix_png(recorder.R, recorder.task_names, recorder.stages, title))
        for lg in self.tensorboard():
            import numpy as np
            from PIL import Image

            lg.experiment.add_image("R_heatmap", np.asarray(Image.open(png).convert("RGB")), step, dataformats="HWC")
        if not self.wandb():
            return
        self.log_image("R_heatmap", png, step)
        # by position, not by task name: runs of different task orders share the keys
        evaluated = [k for k, stage in enumerate(recorder.stages) if stage in recorder.general]
        general = {
            f"general/mean_{'base' if k == 0 else f'stage{k}'}": recorder.general_mean(recorder.stages[k])
            for k in evaluated
        }
        if evaluated and evaluated[-1] > 0:
            general["general/mean_final"] = recorder.general_mean(recorder.stages[evaluated[-1]])
        continual = {f"cl/{k}": v for k, v in recorder.continual_metrics().items() if not isinstance(v, dict)}
        self.summarize(
            {
                **{f"cl/{k}": v for k, v in recorder.cl_metrics().items()},
                **continual,
                "general/delta_RG": recorder.general_delta(),
                **general,
                "stage": len(recorder.R) - 1,
            }
        )

    def save(self) -> None:
        for lg in self.loggers:
            lg.save()

    def _record_outcome(self, recorder) -> None:
        """TensorBoard's HParams tab gets the settings with the run's CL metrics (to compare runs by);
        W&B's summary the status and the seconds of each timing (a list's sum)."""
        results = {f"hparams/{k}": v for k, v in recorder.cl_metrics().items() if v is not None}
        for lg in self.tensorboard():
            if results and self.config is not None:
                lg.log_hyperparams(self.config, metrics=results)
        seconds = {k: sum(v) if isinstance(v, list) else v for k, v in recorder.to_dict()["timings"].items()}
        self.summarize(
            {
                "status": recorder.status,
                **{f"timings/{k}": v for k, v in seconds.items() if isinstance(v, (int, float))},
            }
        )

    def finalize(self, status: str, recorder=None) -> None:
        """End every logger's run (``status``: success or failed); W&B's summary gets the run's
        status as results.json says it (finished, failed, stopped) and its timings (seconds)."""
        if recorder is not None:
            self._record_outcome(recorder)
        for lg in self.loggers:
            lg.finalize(status)
        for lg in self.loggers:
            experiment = getattr(lg, "_experiment", None)
            if isinstance(lg, WandbLogger) and experiment is not None:
                experiment.finish(exit_code=0 if status == "success" else 1)
