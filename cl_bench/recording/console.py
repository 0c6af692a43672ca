"""What a run prints: a Rich console sized for terminals and for log files, and progress bars
kept to one line each when the output is not a terminal.

Libraries draw progress bars with carriage returns (tqdm in lm-eval, datasets, transformers):
in a terminal they redraw one line; in a log file (CI, ``make run > log``, SLURM) every redraw
piles onto a single line that grows to hundreds of kilobytes. :func:`one_line_per_bar` keeps, in a
non-terminal, only the last state of each such line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator
from typing import TextIO

from rich.console import Console

# Logs capture stdout: give tables room there instead of Rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 160)


class LastRedraw(io.TextIOBase):
    """A text stream that writes each line as its last carriage-return segment (a bar's final state)."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.pending = ""

    def write(self, text: str) -> int:
        *lines, rest = (self.pending + text).split("\n")
        for line in lines:
            last = line.rsplit("\r", 1)[-1]
            if last.strip() or "\r" not in line:  # a bar erased at its end leaves no line
                self.stream.write(last + "\n")
        self.pending = "\r" + rest.rsplit("\r", 1)[-1] if "\r" in rest else rest
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def close_pending(self) -> None:
        last = self.pending.rsplit("\r", 1)[-1]
        if last.strip():
            self.stream.write(last + "\n")
        self.pending = ""
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", "utf-8")


@contextlib.contextmanager
def one_line_per_bar() -> Iterator[None]:
    """While inside, a non-terminal stderr shows each progress bar once, in its final state."""
    if sys.stderr.isatty():
        yield
        return
    original, sys.stderr = sys.stderr, LastRedraw(sys.stderr)
    try:
        yield
    finally:
        sys.stderr.close_pending()
        sys.stderr = original


def quiet_library_logs() -> None:
    """Library log lines that read as breakage on every run, and lines that came twice: rouge-score's
    "Using default tokenizer" (absl, at every scoring), Optuna's database migrations (alembic), and
    Lightning's INFO lines, which its own handler printed and Hydra's root handlers printed again
    (kept once, in Hydra's format, in ``cl.log`` too). Optuna's coloured handler gives way to
    Hydra's too: no colour codes in a log file."""
    for name in ("absl", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if logging.getLogger().hasHandlers():
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            lib = logging.getLogger(name)
            for handler in list(lib.handlers):
                lib.removeHandler(handler)
            lib.propagate = True
    if "optuna" in sys.modules:
        optuna = sys.modules["optuna"]
        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()
