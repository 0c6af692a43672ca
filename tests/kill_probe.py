"""A SIGKILL at a chosen point of a run, for the kill-and-resume tests: the process kills itself,
so the kill lands where the test needs it however fast or loaded the machine is (a test that
polls for a file and then kills needs long tasks to be sure to land inside one).

Used as a prelude of a started runner: ``start_module("runners.cl", ..., prelude="tests.kill_probe:in_task_2")``.
"""

import os
import signal

#: optimizer steps between the first step checkpoint of task 2 and the kill: work after the
#: checkpoint (steps, logged rows, continual points) is lost and must be redone by the resume
STEPS_AFTER_CHECKPOINT = 2


def in_task_2() -> None:
    """SIGKILL this process STEPS_AFTER_CHECKPOINT optimizer steps after the first step checkpoint of
    the stream's second task (task index 1) is on disk."""
    from cl_bench.training.checkpointing import StepCheckpoint

    on_batch_end = StepCheckpoint.on_train_batch_end

    def then_kill(self, trainer, *args) -> None:
        on_batch_end(self, trainer, *args)
        if (
            self.task_index == 1
            and self.last_saved > 0
            and trainer.global_step >= self.last_saved + STEPS_AFTER_CHECKPOINT
        ):
            os.kill(os.getpid(), signal.SIGKILL)

    StepCheckpoint.on_train_batch_end = then_kill
