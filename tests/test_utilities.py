"""The utilities written once and used everywhere: input checks, atomic writes, RNG and seeds,
the GPU check, and progress bars in logs."""

import io
import os
import random
import zlib

import numpy as np
import pytest
import torch

from cl_bench.errors import ConfigError, check_choice, check_fraction, check_number, check_numbers
from cl_bench.files import atomic_write
from cl_bench.recording.console import LastRedraw
from cl_bench.rng import derive_seed, preserved_rng, rng_state, set_rng_state
from cl_bench.training.trainer import check_accelerator


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: check_number(0, "train.batch_size", integer=True, low=1),
            "train.batch_size must be an integer >= 1, got 0",
        ),
        (lambda: check_number(2.0, "k", integer=True, low=1), "k must be an integer >= 1, got 2.0"),
        (lambda: check_number(True, "k", low=0), "k must be >= 0, got True"),
        (lambda: check_number(0, "lr", low=0, low_open=True), "lr must be > 0, got 0"),
        (lambda: check_number(1.5, "p", low=0, high=1, low_open=True), r"p must be in \(0, 1\], got 1.5"),
        (lambda: check_number("x", "k"), "k must be a number, got 'x'"),
        (
            lambda: check_number(0, "n", integer=True, low=1, allow_none=True),
            "n must be an integer >= 1 or null, got 0",
        ),
        (
            lambda: check_numbers([1, None, 0], "tasks.epochs", integer=True, low=1, allow_none=True),
            "tasks.epochs values must be integers >= 1, got 0",
        ),
        (lambda: check_fraction(1, "method.alpha"), r"method.alpha must be in \(0, 1\), got 1"),
        (
            lambda: check_choice("dev", ("train", "test"), "eval.split"),
            r"eval.split must be one of \('train', 'test'\), got 'dev'",
        ),
    ],
)
def test_checks_name_the_key_the_rule_and_the_value(call, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        call()


def test_checks_return_good_values():
    assert check_number(None, "n", integer=True, low=1, allow_none=True) is None
    assert check_number(1.0, "p", low=0, high=1, low_open=True) == 1.0
    assert check_numbers([1, None, 3], "e", integer=True, low=1, allow_none=True) == [1, None, 3]
    assert check_choice("a", ("a",), "k") == "a" and check_fraction(0.7, "a") == 0.7


def test_atomic_write_replaces_whole_files_and_leaves_nothing_behind_on_failure(tmp_path):
    path = tmp_path / "sub" / "results.json"
    atomic_write(path, "old")
    atomic_write(path, b"new")
    assert path.read_text() == "new"

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "new" and sorted(p.name for p in path.parent.iterdir()) == ["results.json"]
    folder = atomic_write(tmp_path / "model", lambda tmp: (tmp.mkdir(), (tmp / "w.bin").write_bytes(b"1")))
    assert (folder / "w.bin").read_bytes() == b"1"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    assert f".tmp{os.getpid()}" not in str(folder)


def test_derived_seeds_keep_the_recorded_formulas():
    # changing these changes every shuffled batch order and generated stream: golden values depend on them
    assert derive_seed(42, 3) == 42 * 100_003 + 3
    assert derive_seed(0, "arith") == zlib.crc32(b"arith")
    assert len({derive_seed(s, k) for s in range(3) for k in range(100)}) == 300


def test_preserved_rng_restores_every_generator_and_states_round_trip():
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    with preserved_rng():
        torch.manual_seed(7), random.seed(7), np.random.seed(7)
        torch.rand(5)
    assert (torch.equal(torch.rand(2), expected[0]), random.random(), np.random.rand()) == (True, *expected[1:])
    state = rng_state()
    first = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), first)


def test_a_gpu_trainer_on_a_machine_without_one_says_what_to_set(monkeypatch):
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator
    from omegaconf import OmegaConf

    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))
    monkeypatch.setattr(MPSAccelerator, "is_available", staticmethod(lambda: False))
    with pytest.raises(
        ConfigError,
        match="trainer.accelerator=gpu but this machine has no GPU.*add trainer.accelerator=cpu "
        "trainer.precision=32-true",
    ):
        check_accelerator(OmegaConf.create({"accelerator": "gpu"}))
    check_accelerator(OmegaConf.create({"accelerator": "cpu"}))


def test_progress_bars_keep_their_last_state_on_one_line():
    out = io.StringIO()
    stream = LastRedraw(out)
    for chunk in [
        "Loading:   0%|  | 0/9",
        "\rLoading:  50%|# | 4/9",
        "\rLoading: 100%|##| 9/9\n",
        "plain line\n",
        "\n",
        "tmp bar 1/2\r",
        "          \r",
        "next\rnext done",
        " 2/2\n",
        "tail",
    ]:
        stream.write(chunk)
    stream.close_pending()
    assert out.getvalue().splitlines() == ["Loading: 100%|##| 9/9", "plain line", "", "next done 2/2", "tail"]


def test_the_heartbeat_says_what_the_run_does_with_the_streams_eta(caplog, monkeypatch):
    import logging
    import time

    from cl_bench import progress

    now = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    activity = progress.Activity()
    activity.tasks_finished(0, 4)  # the base stage: the pace starts
    now[0] += 60
    activity.tasks_finished(1, 4)
    activity.doing("evaluating code (task 2/5), batch", total=8)
    activity.advance(3)
    assert (
        activity.eta() == 180
        and activity.line() == "evaluating code (task 2/5), batch 3/8 · 0:01:00 elapsed · stream ETA 0:03:00"
    )
    steps = [7]
    activity.doing("training arith (task 2/4), step", total=40, count=lambda: steps[0])
    assert activity.line().startswith("training arith (task 2/4), step 7/40 · ")
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="cl_bench.progress"):
        with progress.heartbeat(0.05):
            progress.doing("general ability (probe, lm-eval)")
            time.sleep(0.3)
        beats = len(caplog.records)
        time.sleep(0.15)
    assert beats >= 2 and len(caplog.records) == beats  # it stops with the block
    assert caplog.records[-1].getMessage().startswith("… general ability (probe, lm-eval) · 0:00:00 elapsed")


def test_library_lines_come_once_and_quiet(caplog):
    import logging

    from cl_bench.recording.console import quiet_library_logs

    lightning = logging.getLogger("lightning")
    lightning.addHandler(logging.StreamHandler())  # as lightning/__init__.py does: each line printed twice
    with caplog.at_level(logging.INFO):  # a root handler, as Hydra's
        quiet_library_logs()
        assert lightning.handlers == [] and lightning.propagate
        assert not logging.getLogger("absl").isEnabledFor(logging.INFO)
        assert logging.getLogger("absl").isEnabledFor(logging.WARNING)


def test_a_slow_down_of_the_training_steps_is_told_once_with_the_threads_hint(caplog):
    """Issue 37.5: steps 5x slower per token than the run's own first ones (other processes on the
    cores) get one warning that says how to share the cores; a longer task at the same pace does not."""
    from cl_bench.training.pace import StepPace

    steady = StepPace(warmup=2, window=4)
    for seconds in [9.0, 9.0] + [1.0] * 40:  # the warm-up batches are left out
        steady.record(seconds)
    assert not steady.warned and "OMP_NUM_THREADS" not in caplog.text
    slowed = StepPace(warmup=2, window=4)
    for seconds in [1.0] * 6 + [1.2, 3.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]:
        slowed.record(seconds)
    assert slowed.warned and caplog.text.count("OMP_NUM_THREADS=<cores / processes>") == 1
    assert "4.0x as long per token" in caplog.text  # the first window whose median reached 4


def test_processes_on_one_machine_share_its_cores_unless_the_user_set_threads(monkeypatch):
    """Issue 37.5: each of N torch processes started a thread per core; now cores / N each, and an
    OMP_NUM_THREADS the user set (torchrun sets 1) is kept."""
    import torch

    from cl_bench.distributed import share_threads

    monkeypatch.setattr("cl_bench.distributed.cores", lambda: 8)
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(8)
        assert share_threads(1) is None and torch.get_num_threads() == 8
        assert (
            share_threads(3)
            == "torch threads: 2 per process (3 processes at once on 8 cores; OMP_NUM_THREADS overrides)"
        )
        assert torch.get_num_threads() == 2
        torch.set_num_threads(8)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert share_threads(4) is None and torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(before)
