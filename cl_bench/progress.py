"""What a run is doing now, for the person watching it: a heartbeat line in a log, an ETA for the stream.

Evaluation and the general-ability probe print nothing while they run (minutes per stage on a
real model, hours on TRACE), and a log file (SLURM, ``make run > log``) cannot show a progress
bar. The runner and the evaluation loops say what they are doing with :func:`doing` and
:func:`advance`; :func:`heartbeat` logs that state every ``every_s`` seconds (``cl.log`` too),
with the time elapsed and the stream's ETA, so a log shows that the run is alive and where it is.

    with heartbeat(60):
        doing("evaluating code (task 4/5)", total=8)   # 8 batches
        for batch in ...: advance()
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)


def clock(seconds: float) -> str:
    """``seconds`` as h:mm:ss."""
    seconds = int(round(max(seconds, 0)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Activity:
    """The run's current activity, its count of units done out of a total, and the stream's ETA."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """A new run starts (several run in one process in a multirun)."""
        self.started = time.monotonic()
        self.what, self.total, self._done = "", 0, 0
        self._count: Callable[[], int] | None = None
        self.tasks_done = self.tasks_total = 0
        self._pace: tuple[float, int] | None = None  # (monotonic time, tasks done) when the pace started

    def doing(self, what: str, total: int = 0, count: Callable[[], int] | None = None) -> None:
        """Now doing ``what``, of ``total`` units (batches, steps); ``count`` reads the units done
        (e.g. the trainer's step) instead of :meth:`advance`."""
        self.what, self.total, self._done, self._count = what, total, 0, count

    def advance(self, units: int = 1) -> None:
        self._done += units

    @property
    def done(self) -> int:
        return self._count() if self._count is not None else self._done

    def tasks_finished(self, done: int, total: int) -> None:
        """``done`` of ``total`` tasks are trained (the first call starts the pace, e.g. after a resume)."""
        self.tasks_total = total
        if self._pace is None:
            self._pace = (time.monotonic(), done)
        self.tasks_done = done

    def eta(self) -> float | None:
        """Seconds until the stream ends at the pace of the tasks finished since the pace started."""
        if self._pace is None or self.tasks_done <= self._pace[1]:
            return None
        per_task = (time.monotonic() - self._pace[0]) / (self.tasks_done - self._pace[1])
        return per_task * (self.tasks_total - self.tasks_done)

    def times(self) -> str:
        """``0:01:10 elapsed · stream ETA 0:12:00`` (no ETA before a task has finished)."""
        eta = self.eta()
        return f"{clock(time.monotonic() - self.started)} elapsed" + (
            "" if eta is None else f" · stream ETA {clock(eta)}"
        )

    def line(self) -> str:
        """``what 3/8 · 0:01:10 elapsed · stream ETA 0:12:00``."""
        what = f"{self.what} {self.done}/{self.total}" if self.total else self.what
        return " · ".join(p for p in (what, self.times()) if p)


activity = Activity()
doing, advance = activity.doing, activity.advance


def say(line: str) -> None:
    """One line of the run's story (what it will do, each stage's row) into the log, from the main
    process only (the others run the same calls in lockstep)."""
    from cl_bench.distributed import is_main

    if is_main():
        log.info(line)


def work_summary(tasks: int, steps: int, stages: int, answers: int, general: str | None) -> str:
    """What a run will do, said at its start so that what dominates its time is no surprise."""
    probe = f"; general ability: {general}" if general else ""
    return (
        f"This run: {tasks} task(s), {steps} optimizer steps in all; {stages} evaluations of the stream, "
        f"{answers} generated answers each{probe}"
    )


@contextlib.contextmanager
def heartbeat(every_s: float | None) -> Iterator[None]:
    """Within the block (a run; :attr:`activity` starts anew), log the activity's line every
    ``every_s`` seconds (None or 0: never)."""
    activity.reset()
    if not every_s:
        yield
        return
    stop = threading.Event()

    def beat():
        while not stop.wait(every_s):
            log.info("… %s", activity.line())

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
