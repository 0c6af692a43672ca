"""Files a run writes: atomically (a reader, or a resumed run, sees the old file or the new one,
never half of one), into a run dir that one run at a time holds."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from cl_bench.errors import DISK_ERRNOS, ConfigError, RunDirInUse

log = logging.getLogger(__name__)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write(
    path: str | Path, content: str | bytes | Callable[[Path], None], in_place_when_full: bool = False
) -> Path:
    """Write ``content`` (text, bytes, or a function that writes a file or folder at the path it
    is given) to a temporary path beside ``path``, then rename it over ``path``.

    The temporary name carries the process id, so processes writing the same file (parallel jobs
    generating one cached stream) never write into each other's file. Text and bytes are fsynced
    before the rename. If writing fails, the temporary path is removed and ``path`` is untouched;
    the error names ``path``. ``in_place_when_full``: on a full disk (or a dir that no longer takes
    new files), text or bytes that fit in the blocks ``path`` already holds are written over it
    instead (not atomic, but it needs no free space and no new entry in the dir: a run's failure can
    still be recorded in its results.json)."""
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
    except Exception as e:
        full = not isinstance(e, OSError) and _nearly_full(path.parent)
        _remove(tmp)
        # the writer's frames hold the removed file open (its space not freed) as long as the error
        # lives: freed now, so that results.json can still record the failure on a full disk
        _release_frames(e)
        if full:  # e.g. torch's "unexpected pos" when its zip writer hits a full disk
            raise OSError(
                errno.ENOSPC, f"no space left on the device of {path.parent} while writing {path.name}"
            ) from e
        if not isinstance(e, OSError):
            raise
        if in_place_when_full and e.errno in DISK_ERRNOS and _overwrite(path, content):
            return path
        if e.filename is None or Path(e.filename) == tmp:  # "No space left on device", or a temporary's name
            raise type(e)(e.errno, f"{e.strerror or e} while writing {path}") from e
        raise
    except BaseException:
        _remove(tmp)
        raise
    return path


def _overwrite(path: Path, content: str | bytes | Callable[[Path], None]) -> bool:
    """Write ``content`` over ``path`` in the blocks it holds, if it fits in them; True if written."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    try:
        if not isinstance(data, bytes) or len(data) > path.stat().st_blocks * 512:
            return False
        with open(path, "r+b") as f:
            f.write(data)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        return True
    except OSError:
        return False


def _release_frames(error: BaseException | None) -> None:
    """Clear the local variables of every finished frame in ``error``'s chain (its tracebacks stay)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def check_writable_dir(path: str | Path, what: str) -> Path:
    """``path`` created if needed and written to once (a file made and removed), or a ConfigError
    naming ``what`` (a config key or "run dir") and the system's reason: a read-only or full disk, or
    a folder of another user, refused before anything is loaded rather than at the first write."""
    folder = Path(path).expanduser()
    probe = folder / f".write-check.tmp{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"0")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"{what} {folder} is not writable ({e.strerror or e}); choose another folder or free or unlock this one"
        ) from None
    return folder


def _nearly_full(folder: Path, margin: int = 1 << 20) -> bool:
    try:
        return shutil.disk_usage(folder).free < margin
    except OSError:
        return False


class RunDirLock:
    """One run per run dir: ``<dir>/.lock`` names the holding process (pid and host).

    A second run into a held dir is refused, naming the holder. A lock is stale, and taken over
    with a warning, when its process is gone: on this host, no process has its pid, or the one that
    has it started at another time or before another boot (a pid reused, say after a container
    restart, this process's own pid included). A lock of another
    host is never taken over: the refusal says to delete it by hand once that run is known gone.
    Released on exit.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self.held = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _identity(pid: int) -> dict:
        """What tells one process from a later one with the same pid (Linux: the boot and the start
        time in clock ticks after it); empty where /proc is not there."""
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
            started = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            return {}
        return {"boot": boot, "started": started}

    @classmethod
    def _alive(cls, holder: dict) -> bool:
        pid = int(holder.get("pid", -1))
        if pid <= 0:
            return False  # no process named: a garbage lock
        if holder.get("host") != socket.gethostname():
            return True  # another machine's process cannot be checked from here
        recorded = {k: holder[k] for k in ("boot", "started") if k in holder}
        if pid == os.getpid() and not recorded:
            return False  # this process's pid in a lock without its start: from before a restart
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return not recorded or cls._identity(pid) == recorded  # a pid reused by a later process: stale

    def acquire(self) -> None:
        check_writable_dir(self.path.parent, "run dir")  # its own error, not a PermissionError on .lock
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # being written this instant, or garbage: stale only when old
                    if time.time() - self.path.stat().st_mtime < 10:
                        time.sleep(0.2)
                        continue
                elif self._alive(holder):
                    raise RunDirInUse(
                        f"run dir {self.path.parent} is in use by process {holder.get('pid')} on {holder.get('host')} "
                        f"(lock {self.path}); wait for it to finish, or choose another hydra.run.dir (if that "
                        f"process is known to be gone, delete {self.path})"
                    ) from None
                log.warning("taking over the stale lock %s (%s)", self.path, holder or "unreadable")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), **self._identity(os.getpid())}, f)
            self.held = True
            self._remove_stale_temporaries()
            return
        raise ConfigError(f"could not lock run dir {self.path.parent} ({self.path} keeps changing)")

    def _remove_stale_temporaries(self) -> None:
        """Temporary files of writers that died mid-write (a killed run): theirs, never a live one's."""
        for tmp in self.path.parent.rglob(".*.tmp*"):
            pid = tmp.name.rsplit(".tmp", 1)[-1]
            if (
                pid.isdigit()
                and int(pid) != os.getpid()
                and not self._alive({"pid": int(pid), "host": socket.gethostname()})
            ):
                _remove(tmp)

    def release(self) -> None:
        """Let the dir go; a lock that cannot be removed (a dir made read-only under the run) is
        logged, never raised: the error that ended the run must not be hidden by this one."""
        if self.held:
            self.held = False
            try:
                self.path.unlink(missing_ok=True)
            except OSError as e:
                log.error("could not remove the run dir's lock %s (%s): delete it by hand", self.path, e.strerror or e)
