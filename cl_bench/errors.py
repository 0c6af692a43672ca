"""The one error type raised for bad user input, the checks that raise it, and the stop that a
signal (SIGTERM, Ctrl-C) makes of a run.

Every config value and data record is checked by these few functions, so a bad value always gets
the same kind of message: the key (or file and record) at fault, what it must be, what it was.
"""

from __future__ import annotations

import contextlib
import errno
import math
import signal
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any


class ConfigError(ValueError):
    """Bad input: the message names the config key, file or record at fault."""


class RunDirInUse(ConfigError):
    """Another run holds the run dir: nothing may be written there."""


class Diverged(FloatingPointError):
    """Training diverged (a non-finite loss or weight): the message says where and what to change."""

    def __init__(self, what: str):
        super().__init__(
            f"{what}: training diverged; the stages before it are kept. Lower optimizer.lr, "
            "clip gradients (trainer.gradient_clip_val=1.0) or train in trainer.precision=32-true"
        )


class StoppedBySignal(SystemExit):
    """A run stopped by SIGTERM or SIGINT (Ctrl-C): recorded as "stopped", the process exits with
    128 + the signal's number (143, 130), as a shell reports a process a signal ended."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"stopped by signal {signal.Signals(self.signum).name}"


#: errors of the disk, not of the program: a full disk (or quota), a read-only or foreign folder
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def is_user_error(error: BaseException) -> bool:
    """An error the user fixes (bad input, a full or read-only disk, a diverged run): one line says it all."""
    return isinstance(error, (ConfigError, Diverged)) or (isinstance(error, OSError) and error.errno in DISK_ERRNOS)


def as_stop(error: BaseException) -> StoppedBySignal | None:
    """The stop a signal made of ``error``: :class:`StoppedBySignal` itself, Ctrl-C's
    KeyboardInterrupt, or Lightning's SIGTERMException (the SystemExit its own SIGTERM handler
    leads to); None for any other error."""
    if isinstance(error, StoppedBySignal):
        return error
    if isinstance(error, KeyboardInterrupt):
        return StoppedBySignal(signal.SIGINT)
    if isinstance(error, SystemExit) and type(error).__name__ == "SIGTERMException":
        return StoppedBySignal(signal.SIGTERM)
    return None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block SIGTERM and SIGINT raise :class:`StoppedBySignal` where the process is
    (Lightning's own SIGTERM handler, during a fit, calls this one after it); outside it the
    handlers before it are back. Only the main thread can take signals: elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise StoppedBySignal(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def check_flag(value: Any, key: str) -> bool:
    """A setting that must be true or false (not a string such as "maybe")."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def check_choice(value: Any, choices: Sequence[Any], key: str) -> Any:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{key} must be one of {tuple(choices)}, got {value!r}")
    return value


def _describe(integer: bool, low, high, low_open: bool, high_open: bool, plural: bool = False) -> str:
    """E.g. "an integer >= 1", "in (0, 1]", "> 0", "integers >= 1"."""
    if low is not None and high is not None:
        bound = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        bound = f"{'>' if low_open else '>='} {low}"
    elif high is not None:
        bound = f"{'<' if high_open else '<='} {high}"
    else:
        bound = ""
    if integer:
        kind = "integers" if plural else "an integer"
    else:
        kind = "numbers" if plural else ("" if bound else "a number")
    return " ".join(filter(None, [kind, bound]))


def check_number(
    value: Any,
    key: str,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> Any:
    """``value`` if it is a finite number (an int when ``integer``; never a bool) within the bounds.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``; ``allow_none`` accepts None.
    The error reads e.g. "train.batch_size must be an integer >= 1, got 0".
    """
    if value is None and allow_none:
        return value
    wrong_type = isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
    non_finite = not wrong_type and not math.isfinite(value)
    if (
        wrong_type
        or non_finite
        or (low is not None and (value <= low if low_open else value < low))
        or (high is not None and (value >= high if high_open else value > high))
    ):
        expected = _describe(integer, low, high, low_open, high_open) + (" or null" if allow_none else "")
        raise ConfigError(f"{key} must be {f'finite ({expected})' if non_finite else expected}, got {value!r}")
    return value


def check_numbers(
    values: Iterable[Any],
    key: str,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    allow_none: bool = False,
) -> list[Any]:
    """:func:`check_number` for each value of a per-task list; the error names the list's key."""
    values = list(values)
    for v in values:
        try:
            check_number(v, key, integer=integer, low=low, high=high, allow_none=allow_none)
        except ConfigError:
            expected = _describe(integer, low, high, False, False, plural=True)
            raise ConfigError(f"{key} values must be {expected}, got {v!r}") from None
    return values


def check_fraction(value: Any, key: str) -> float:
    """A fraction strictly between 0 and 1 (a masking rate, a quantile)."""
    return check_number(value, key, low=0, high=1, low_open=True, high_open=True)
