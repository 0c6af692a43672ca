"""Hydra's record of a run (``<run dir>/.hydra/``) kept when a rerun in that dir is refused.

Hydra writes ``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` before the run starts,
so a rerun in an existing run dir that is then refused (changed settings on resume, a dir held
by another run) would leave the refused settings as the dir's record. :class:`KeepRunRecord`, a
Hydra callback (``conf/config.yaml``), copies an existing record aside before Hydra writes;
the entry point puts it back with :func:`restore_record` when the run is refused and drops the
copy with :func:`discard_backup` otherwise. A multirun's own record (``multirun.yaml`` at the
sweep dir's root) is kept the same way when every job of a rerun is refused. Every record is
redacted of credentials before anything can fail (:func:`redact_record`, :func:`redact_file`).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from cl_bench.errors import ConfigError
from cl_bench.files import check_writable_dir

BACKUP_SUFFIX = ".before-rerun"
#: the record a multirun's launcher writes at the sweep dir's root
MULTIRUN_RECORD = "multirun.yaml"
#: run dirs that did not exist when this process's command started (Hydra then made them)
_NEW_RUN_DIRS: set[Path] = set()


def _record(run_dir: str | Path, subdir: str) -> Path:
    return Path(run_dir) / subdir


def _check_writable(folder: str, key: str) -> None:
    """A run or sweep dir that cannot be written ends the command here with one line and status 1
    (Hydra turns a callback's exception into a warning and then fails on its log file, 30 lines)."""
    try:
        check_writable_dir(folder, key)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)


def _back_up(record: Path) -> None:
    if (record / "config.yaml").is_file():
        backup = record.with_name(record.name + BACKUP_SUFFIX)
        shutil.rmtree(backup, ignore_errors=True)
        shutil.copytree(record, backup)


class KeepRunRecord(Callback):
    """Copies ``<run dir>/.hydra`` to ``.hydra.before-rerun`` before Hydra overwrites it: before a
    single run; in a multirun, every job dir's record at its start and a finished job's record at
    its end (Hydra writes a job's record before any callback of the job runs, so a later job of
    the same sweep refused in that dir puts back the record of the run that is there)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra sets its HydraConfig only when the job starts, after this callback; the default run
        # dir's name (run_name) reads ${hydra:runtime.choices...} and could not be resolved here
        HydraConfig.instance().set_config(config)
        if not Path(config.hydra.run.dir).exists():
            _NEW_RUN_DIRS.add(Path(config.hydra.run.dir).absolute())
        _check_writable(config.hydra.run.dir, "hydra.run.dir")  # before Hydra's log file fails in it
        if config.hydra.output_subdir is not None:
            _back_up(_record(config.hydra.run.dir, config.hydra.output_subdir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable(config.hydra.sweep.dir, "hydra.sweep.dir")
        self.started = time.time() - 1  # file times may be rounded to the second
        sweep = Path(config.hydra.sweep.dir)
        if (sweep / MULTIRUN_RECORD).is_file():  # the sweep's own record, rewritten by the launcher
            shutil.copy2(sweep / MULTIRUN_RECORD, sweep / (MULTIRUN_RECORD + BACKUP_SUFFIX))
        if config.hydra.output_subdir is not None:
            for record in sweep.glob(f"*/{config.hydra.output_subdir}"):
                _back_up(record)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode.name == "MULTIRUN":  # the launcher wrote the sweep's record: its secrets go
            redact_file(Path(config.hydra.sweep.dir) / MULTIRUN_RECORD)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """A rerun of a sweep whose every job was refused leaves the sweep's record as it was."""
        from cl_bench.recording.sweep_summary import sweep_jobs

        sweep = Path(config.hydra.sweep.dir)
        backup = sweep / (MULTIRUN_RECORD + BACKUP_SUFFIX)
        if not backup.is_file():
            return
        rows = sweep_jobs(sweep, getattr(self, "started", 0.0))
        if rows and all(r["status"] == "refused" for r in rows):
            backup.replace(sweep / MULTIRUN_RECORD)
        else:
            backup.unlink()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        value = getattr(job_return, "_return_value", None)
        refused_or_failed = isinstance(value, float) and value != value  # the entry point's NaN
        if config.hydra.output_subdir is not None and not refused_or_failed and config.hydra.mode.name == "MULTIRUN":
            _back_up(_record(config.hydra.runtime.output_dir, config.hydra.output_subdir))


def restore_record(run_dir: str | Path, subdir: str = ".hydra") -> bool:
    """Put the copied record back (the rerun was refused); True if there was one."""
    record = _record(run_dir, subdir)
    backup = record.with_name(record.name + BACKUP_SUFFIX)
    if not backup.is_dir():
        return False
    shutil.rmtree(record, ignore_errors=True)
    backup.rename(record)
    return True


def discard_backup(run_dir: str | Path, subdir: str = ".hydra") -> None:
    record = _record(run_dir, subdir)
    shutil.rmtree(record.with_name(record.name + BACKUP_SUFFIX), ignore_errors=True)


def redact_record(run_dir: str | Path, subdir: str = ".hydra") -> None:
    """Hide credentials (cl_bench/secrets.py: ``+api_token=...``, a W&B key) in the record Hydra
    wrote: config.yaml's values and the overrides in overrides.yaml and hydra.yaml."""
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        redact_file(_record(run_dir, subdir) / name)


def redact_file(path: Path) -> None:
    """Hide credentials in one of Hydra's records: a list of overrides (overrides.yaml), or a config
    whose ``hydra`` node lists the command's overrides (config.yaml, hydra.yaml, multirun.yaml)."""
    import yaml

    from cl_bench.files import atomic_write
    from cl_bench.secrets import redact, redact_override

    if not path.is_file():
        return
    data = yaml.safe_load(path.read_text())
    if isinstance(data, list):
        data = [redact_override(o) for o in data]
    elif isinstance(data, dict):
        data = redact(data)
        overrides = (data.get("hydra") or {}).get("overrides") or {}
        for group in ("task", "hydra"):
            overrides[group] = [redact_override(o) for o in overrides.get(group) or []]
        job = (data.get("hydra") or {}).get("job") or {}
        if job.get("override_dirname"):
            job["override_dirname"] = ",".join(redact_override(o) for o in job["override_dirname"].split(","))
    atomic_write(path, yaml.safe_dump(data, sort_keys=False))


def with_run_overrides(argv: list[str]) -> list[str]:
    """The command line with ``resume=<run dir>`` standing for that run's own command.

    The run's recorded overrides (``<dir>/.hydra/overrides.yaml``) come first and the ones given
    now after them, so that a setting given now wins and a changed one is refused by the resume
    check, naming it; Hydra's run dir becomes the run's own, so its ``cl.log`` and record go on.
    Left as it is: a multirun, a dir without a record, a command that sets ``hydra.run.dir``
    itself. A redacted secret (``+api_token=...``) is recorded as "***": give it again.
    """
    import yaml

    given = [a for a in argv[1:] if not a.startswith("-")]
    resume = next((a.split("=", 1)[1] for a in given if a.startswith("resume=")), None)
    if resume is None or {"-m", "--multirun"} & set(argv) or any(a.startswith("hydra.run.dir=") for a in given):
        return argv
    record = Path(resume).expanduser() / ".hydra" / "overrides.yaml"
    if not record.is_file():
        return argv
    key = lambda override: override.split("=", 1)[0].lstrip("+~")  # noqa: E731
    keys_given = {key(a) for a in given}
    recorded = [o for o in yaml.safe_load(record.read_text()) or [] if key(o) not in keys_given | {"resume"}]
    return [argv[0], *recorded, *argv[1:], f"hydra.run.dir={Path(resume).expanduser()}"]


def remove_new_run_dir(run_dir: str | Path) -> bool:
    """Remove ``run_dir`` if this command made it (it holds only Hydra's record and log): a single
    run refused before it began leaves no run dir behind. True if it was removed."""
    run_dir = Path(run_dir).absolute()
    if run_dir not in _NEW_RUN_DIRS:
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    _NEW_RUN_DIRS.discard(run_dir)
    return True
