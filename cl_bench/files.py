"""Atomic writes: a reader (or a resumed run) sees the old file or the new one, never half of one."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write(path: str | Path, content: str | bytes | Callable[[Path], None]) -> Path:
    """Write ``content`` (text, bytes, or a function that writes a file or folder at the path it
    is given) to a temporary path beside ``path``, then rename it over ``path``.

    The temporary name carries the process id, so processes writing the same file (parallel jobs
    generating one cached stream) never write into each other's file. Text and bytes are fsynced
    before the rename. If writing fails, the temporary path is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _remove(tmp)
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path
