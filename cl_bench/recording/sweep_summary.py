"""The end of a multirun: a table of its jobs (status, objective, dir), and a non-zero exit when
any job did not finish, so that a sweep whose every job failed does not look like a success.

A Hydra callback (``conf/config.yaml``, ``hydra.callbacks.sweep_summary``). The jobs are the run
dirs under ``hydra.sweep.dir`` that Hydra set up during this multirun (their ``.hydra`` record is
newer than its start), so jobs of an earlier multirun in the same dir are not counted; each job's
``results.json`` says how it ended.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.table import Table

from cl_bench.recording.console import console, quiet_library_logs

JOB_RECORDS = ".jobs"


def record_job_end(sweep_dir: str | Path, job: Any, run_dir: str | Path, status: str, error: str | None) -> None:
    """A job that did not finish says so in ``<sweep dir>/.jobs/<job num>.json``, beside (never in)
    its run dir: a job refused because its dir holds another run must not be read off that run's
    results.json as "finished"."""
    from cl_bench.files import atomic_write

    atomic_write(
        Path(sweep_dir) / JOB_RECORDS / f"{job}.json",
        json.dumps({"dir": str(run_dir), "status": status, "error": error}),
    )


def sweep_jobs(sweep_dir: str | Path, since: float = 0.0) -> list[dict[str, Any]]:
    """One row per job dir under ``sweep_dir`` set up at or after ``since`` (a Unix time): its
    dir, status ("finished", "failed", "running", or "no results" when none were written), the
    objective's value and the error; a results.json from before ``since`` is another (earlier)
    run's, not a job's. A job's own record of not finishing (:func:`record_job_end`) is a row too,
    unless its dir's results.json already says so."""
    rows = _result_rows(sweep_dir, since)
    for record in sorted(Path(sweep_dir).glob(f"{JOB_RECORDS}/*.json"), key=lambda p: p.stat().st_mtime):
        if record.stat().st_mtime < since:
            continue
        job = json.loads(record.read_text())
        row = {"dir": job["dir"], "status": job["status"], "objective": None, "error": job["error"]}
        unwritten = [i for i, r in enumerate(rows) if r["dir"] == job["dir"] and r["status"] == "no results"]
        if unwritten:
            rows[unwritten[0]] = row
        elif not any(r["dir"] == job["dir"] and r["status"] != "finished" for r in rows):
            rows.append(row)  # (a finished row of that dir is another job's)
    return rows


def _result_rows(sweep_dir: str | Path, since: float) -> list[dict[str, Any]]:
    rows = []
    for record in sorted(Path(sweep_dir).glob("*/.hydra/overrides.yaml"), key=lambda p: p.stat().st_mtime):
        if record.stat().st_mtime < since:
            continue
        run_dir = record.parent.parent
        file = run_dir / "results.json"
        try:  # a results.json older than the sweep is an earlier run's: this job wrote none (see .jobs)
            results = json.loads(file.read_text()) if file.stat().st_mtime >= since else None
        except (OSError, ValueError):
            results = None
        if results is None:
            rows.append({"dir": str(run_dir), "status": "no results", "objective": None, "error": None})
            continue
        objective = (results.get("config") or {}).get("objective", "op")
        rows.append(
            {
                "dir": str(run_dir),
                "status": results.get("status", "?"),
                "objective": (results.get("cl_metrics") or {}).get(objective),
                "objective_name": objective,
                "error": results.get("error"),
            }
        )
    return rows


class SweepSummary(Callback):
    """Prints the jobs of a multirun when it ends; exits with status 1 if any did not finish."""

    def __init__(self) -> None:
        self.started = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time() - 1  # file times may be rounded to the second
        quiet_library_logs()  # the sweeper's own lines (Optuna's) come before any job's

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("dry_run"):  # a preview: no job ran
            return
        rows = sweep_jobs(config.hydra.sweep.dir, self.started)
        table = Table(title=f"Multirun: {len(rows)} jobs in {config.hydra.sweep.dir}")
        for column in ("job", "status", "objective", "error"):
            table.add_column(column, overflow="fold")
        for row in rows:
            value = row["objective"]
            shown = "-" if value is None else f"{row.get('objective_name', 'op')} {value:.2f}"
            error = " ".join((row["error"] or "").split())
            table.add_row(Path(row["dir"]).name, row["status"], shown, error[:160])
        console.print(table)
        failed = [r for r in rows if r["status"] != "finished"]
        if failed:
            console.print(f"{len(failed)} of {len(rows)} jobs did not finish (see their results.json)")
            sys.exit(1)
