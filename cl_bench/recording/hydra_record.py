"""Hydra's record of a run (``<run dir>/.hydra/``) kept when a rerun in that dir is refused.

Hydra writes ``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` before the run starts,
so a rerun in an existing run dir that is then refused (changed settings on resume, a dir held
by another run) would leave the refused settings as the dir's record. :class:`KeepRunRecord`, a
Hydra callback (``conf/config.yaml``), copies an existing record aside before Hydra writes;
the entry point puts it back with :func:`restore_record` when the run is refused and drops the
copy with :func:`discard_backup` otherwise.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

BACKUP_SUFFIX = ".before-rerun"


def _record(run_dir: str | Path, subdir: str) -> Path:
    return Path(run_dir) / subdir


class KeepRunRecord(Callback):
    """Copies ``<run dir>/.hydra`` to ``.hydra.before-rerun`` before Hydra overwrites it (single runs)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        subdir = config.hydra.output_subdir
        if subdir is None:
            return
        record = _record(config.hydra.run.dir, subdir)
        if (record / "config.yaml").is_file():
            backup = record.with_name(record.name + BACKUP_SUFFIX)
            shutil.rmtree(backup, ignore_errors=True)
            shutil.copytree(record, backup)


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
