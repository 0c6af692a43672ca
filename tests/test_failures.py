"""When things go wrong nothing is lost and nothing is reported wrong: divergence, corrupt
checkpoints, two runs in one dir, path-like task names, unreadable data files, bad settings."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cl_bench.data.tasks import read_split
from cl_bench.errors import ConfigError, RunDirInUse
from cl_bench.files import RunDirLock
from cl_bench.stream_run import run
from tests.conftest import ROOT, write_stream
from tests.launch import run_module, start_module

SHORT = ["tasks.order=[arith,code,sentiment]", "checkpoint.keep_stages=null"]


def _results(out_dir) -> dict:
    return json.loads((Path(out_dir) / "results.json").read_text())


def _stages(out_dir) -> list[str]:
    return sorted(p.name for p in (Path(out_dir) / "checkpoints").glob("stage-*.pt"))


# --- divergence --------------------------------------------------------------------------------
def test_a_diverged_run_fails_and_keeps_the_last_good_stage(make_config):
    from cl_bench.errors import is_user_error

    cfg = make_config("optimizer.lr=1e30", "checkpoint.keep_stages=1")
    with pytest.raises(
        FloatingPointError,
        match="non-finite .* task 'sentiment' at step \\d+: training diverged; the "
        "stages before it are kept. Lower optimizer.lr",
    ) as diverged:
        run(cfg, cfg.paths.output_dir)
    assert is_user_error(diverged.value)  # the entry point prints its one line, not a traceback
    res = _results(cfg.paths.output_dir)
    assert res["status"] == "failed" and "non-finite" in res["error"] and len(res["R"]) == 1
    assert _stages(cfg.paths.output_dir) == ["stage-000.pt"]  # the base stage was not pruned


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_non_finite_settings_are_refused_at_start(make_config, value):
    cfg = make_config(f"optimizer.lr={value}")
    with pytest.raises(ConfigError, match=f"optimizer.lr must be finite \\(> 0\\), got {value}"):
        run(cfg, cfg.paths.output_dir)


# --- corrupt checkpoints -----------------------------------------------------------------------
def test_a_corrupt_last_stage_falls_back_to_the_previous_one_and_keeps_every_row(make_config):
    cfg = make_config(*SHORT)
    finished = run(cfg, cfg.paths.output_dir).R
    out = Path(cfg.paths.output_dir)
    last = out / "checkpoints" / "stage-003.pt"
    last.write_bytes(last.read_bytes()[:100])
    resumed = run(make_config(*SHORT), out)
    assert resumed.R == finished and _results(out)["R"] == finished and _results(out)["status"] == "finished"
    assert torch.load(last, weights_only=True)["tasks_done"] == 3  # written again, whole


def test_no_readable_stage_is_refused_and_the_results_stay(make_config):
    cfg = make_config("tasks.order=[arith]")
    run(cfg, cfg.paths.output_dir)
    out = Path(cfg.paths.output_dir)
    before = (out / "results.json").read_text()
    for p in (out / "checkpoints").glob("stage-*.pt"):
        p.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="no stage checkpoint is readable \\(stage-001.pt\\)"):
        run(make_config("tasks.order=[arith]"), out)
    assert (out / "results.json").read_text() == before


def test_saving_a_stage_drops_the_unrestorable_ones_after_it(make_config, tmp_path):
    from cl_bench.training.checkpointing import StreamCheckpoints

    ckpt = StreamCheckpoints(tmp_path, keep_stages=1)
    ckpt.save_stage({"tasks_done": 1}, 1)
    (tmp_path / "checkpoints" / "stage-003.pt").write_bytes(b"corrupt")
    ckpt.save_stage({"tasks_done": 2}, 2)
    assert _stages(tmp_path) == ["stage-002.pt"]


def test_resume_of_a_dir_without_a_run_is_refused(make_config, tmp_path):
    cfg = make_config(f"resume={tmp_path / 'nothing'}")
    with pytest.raises(ConfigError, match="resume=.*nothing: no run to resume there"):
        run(cfg, cfg.paths.output_dir)


# --- one run per dir ----------------------------------------------------------------------------
def test_a_second_run_into_a_held_dir_is_refused_naming_the_holder(make_config):
    cfg = make_config("tasks.order=[arith]")
    lock = RunDirLock(cfg.paths.output_dir)
    lock.acquire()
    try:
        with pytest.raises(RunDirInUse, match=f"in use by process {os.getpid()} on "):
            run(cfg, cfg.paths.output_dir)
        assert not (Path(cfg.paths.output_dir) / "results.json").exists()
    finally:
        lock.release()
    run(cfg, cfg.paths.output_dir)
    assert not (Path(cfg.paths.output_dir) / ".lock").exists()


def test_a_killed_holder_leaves_a_stale_lock_that_the_next_run_takes_over(make_config):
    cfg = make_config("tasks.order=[arith]")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from cl_bench.files import RunDirLock; "
            "RunDirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
            cfg.paths.output_dir,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((Path(cfg.paths.output_dir) / ".lock").read_text())["pid"] == holder.pid
    assert run(cfg, cfg.paths.output_dir).status == "finished"


def test_stale_locks_are_told_by_more_than_the_pid(tmp_path, caplog):
    """Issue 25.4: a lock holding this process's own pid from before a restart (another start time,
    or none recorded) or a live pid whose process started at another time (the pid reused) is stale;
    a live holder with the recorded start (this process too), or a lock of another host, is refused,
    saying how to take it over by hand."""
    import socket

    lock = RunDirLock(tmp_path)
    me = {"pid": os.getpid(), "host": socket.gethostname(), **RunDirLock._identity(os.getpid())}
    assert me.get("started")  # /proc is there on this machine
    for stale in (
        {**me, "started": "1"},
        {"pid": os.getpid(), "host": me["host"]},
        {"pid": os.getppid(), "host": me["host"], "boot": me["boot"], "started": "1"},
        {"pid": os.getppid(), "host": me["host"], "boot": "another boot", "started": "1"},
    ):
        lock.path.write_text(json.dumps(stale))
        lock.acquire()
        assert json.loads(lock.path.read_text()) == me and "taking over the stale lock" in caplog.text
        lock.release()
    parent = {"pid": os.getppid(), "host": me["host"], **RunDirLock._identity(os.getppid())}
    for live in (parent, me, {"pid": 1, "host": "another-host"}):  # me: this process holds it
        lock.path.write_text(json.dumps(live))
        with pytest.raises(RunDirInUse, match=f"if that process is known to be gone, delete {lock.path}"):
            lock.acquire()


@pytest.mark.processes
def test_two_runs_in_one_dir_the_second_is_refused_and_the_first_finishes(tmp_path):
    out = tmp_path / "shared"
    args = ["experiment=smoke", "general=none", f"hydra.run.dir={out}", f"paths.cache_dir={tmp_path / 'cache'}"]
    first = start_module("runners.cl", *args, "tasks.order=[arith,code]")
    deadline = time.time() + 120

    def holder_written() -> bool:  # the lock made and its holder written (not stopped between the two)
        try:
            return json.loads((out / ".lock").read_text()).get("pid") == first.pid
        except (OSError, ValueError):
            return False

    while not holder_written() and time.time() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # it holds the dir, however fast or slow this machine is
    try:
        second = run_module("runners.cl", *args)
        assert first.poll() is None, "the first run ended before the second started: the test proves nothing"
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0
    assert second.returncode == 1 and f"is in use by process {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    assert _results(out)["status"] == "finished" and not (out / ".lock").exists()


# --- task names and data files -------------------------------------------------------------------
@pytest.mark.parametrize(
    "tasks, message",
    [
        (
            "[{name: ../outside/X, metric: accuracy, max_new_tokens: 4}]",
            "task name '../outside/X' is not a plain folder name",
        ),
        ("[{name: /etc, metric: accuracy, max_new_tokens: 4}]", "task name '/etc' is not a plain folder name"),
        ("[{name: $$, metric: accuracy, max_new_tokens: 4}]", "task name '\\$\\$' is not a plain folder name: letters"),
        ("[{name: '[bold]x', metric: accuracy, max_new_tokens: 4}]", "task name '\\[bold\\]x' is not a plain folder"),
        ("[{name: 'a|b', metric: accuracy, max_new_tokens: 4}]", "task name 'a\\|b' is not a plain folder name"),
        (
            "[{name: A, metric: accuracy, max_new_tokens: 4}, {name: A, metric: rouge_l, max_new_tokens: 8}]",
            "task name 'A' is declared twice",
        ),
        ("[{name: A, metric: accuracy, max_new_tokens: 0}]", "task A: max_new_tokens must be an integer >= 1"),
    ],
)
def test_path_like_and_duplicate_task_names_are_refused_before_the_model_loads(
    make_config, tmp_path, monkeypatch, tasks, message
):
    data = write_stream(tmp_path / "data", {"A": 2})
    cfg = make_config("model=tiny_llama", "tasks=custom", f"tasks.data_dir={data}", f"tasks.tasks={tasks}", tiny=False)
    monkeypatch.setattr("cl_bench.models.tiny_llama", lambda **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match=message):
        run(cfg, cfg.paths.output_dir)


def test_a_lone_surrogate_is_refused_naming_the_file_and_record(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[{"prompt": "fine", "answer": "ok"}, {"prompt": "bad \\ud800 here", "answer": "x"}]')
    with pytest.raises(ConfigError, match=f"{path}: record 1 'prompt' holds a lone surrogate"):
        read_split(path)


def test_invalid_utf8_is_reported_in_one_short_line_naming_file_and_offset(tmp_path):
    path = tmp_path / "train.json"
    path.write_bytes(b'[{"prompt": "p", "answer": "' + b"x" * 5_000_000 + b'\xff"}]')
    with pytest.raises(ConfigError) as err:
        read_split(path)
    message = str(err.value)
    assert message.startswith(f"{path}: not UTF-8 text (byte 0xff at offset 5000028") and len(message) < 500


def test_a_folder_named_like_a_split_is_not_called_missing(tmp_path):
    (tmp_path / "train.json").mkdir()
    with pytest.raises(ConfigError, match="train.json is a folder; expected a JSON file"):
        read_split(tmp_path / "train.json")


@pytest.mark.parametrize(
    "override, message",
    [
        ("seed=abc", "seed must be an integer in \\[0, 4294967295\\], got 'abc'"),
        ("seed=-5", "seed must be an integer in \\[0, 4294967295\\], got -5"),
        ("seed=1.5", "seed must be an integer in \\[0, 4294967295\\], got 1.5"),
    ],
)
def test_bad_seeds_are_named_at_start(make_config, override, message):
    cfg = make_config(override)
    with pytest.raises(ConfigError, match=message):
        run(cfg, cfg.paths.output_dir)


def test_a_config_error_prints_one_line_without_a_traceback(tmp_path):
    proc = run_module(
        "runners.cl",
        "model=tiny_llama",
        "general=none",
        "optimizer.lr=-1",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "Error: optimizer.lr must be > 0, got -1"
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # issue 37.7: a refused single run leaves no run dir behind


# --- records of a resumed or refused run ----------------------------------------------------------
def test_a_resume_keeps_the_csv_rows_before_it_and_logs_into_the_runs_own_dir(make_config, tmp_path):
    cfg = make_config(*SHORT, "logger=csv")
    run(cfg, cfg.paths.output_dir)
    out = Path(cfg.paths.output_dir)
    metrics = out / "csv" / "metrics.csv"
    before = metrics.read_text().splitlines()
    last = out / "checkpoints" / "stage-003.pt"
    last.write_bytes(b"corrupt")
    elsewhere = tmp_path / "new_hydra_dir"
    run(make_config(*SHORT, "logger=csv", f"resume={out}", f"paths.output_dir={elsewhere}"), elsewhere)
    assert not (elsewhere / "csv").exists()
    after = metrics.read_text().splitlines()
    stage_rows = lambda lines: [r for r in lines[1:] if r.split(",")[lines[0].split(",").index("stage")] != ""]  # noqa: E731
    assert len(stage_rows(after)) == len(stage_rows(before)) == 4  # base + 3 stages, none lost or doubled
    assert len(after) == len(before)


@pytest.mark.processes
def test_a_refused_rerun_leaves_the_runs_hydra_record_as_it_was(tmp_path):
    out = tmp_path / "refused-rerun-record"  # a name no other run dir has (the glob below looks for it)
    args = ["experiment=smoke", "general=none", "tasks.order=[arith]", f"hydra.run.dir={out}"]
    args.append(f"paths.cache_dir={tmp_path / 'cache'}")
    assert run_module("runners.cl", *args).returncode == 0
    record = (out / ".hydra" / "config.yaml").read_text()
    refused = run_module("runners.cl", *args, "optimizer.lr=0.5")
    assert refused.returncode == 1 and "cannot resume" in refused.stderr and "optimizer.lr" in refused.stderr
    assert (out / ".hydra" / "config.yaml").read_text() == record
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".hydra")) == [".hydra"]
    # resume=<dir> alone is the run's own command (issue 25.5): it once ran the defaults and was refused
    alone = run_module("runners.cl", f"resume={out}", timeout=300)
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert "Resuming" in alone.stdout and json.loads((out / "results.json").read_text())["status"] == "finished"
    assert "Resuming" in (out / "cl.log").read_text()  # the run's own log goes on
    assert not list(ROOT.glob(f"outputs/*/*{out.name}*"))


def test_the_run_record_is_kept_in_a_dir_named_by_the_run_name(tmp_path):
    """Issue 37.4: in the default run dir (named by run_name, which reads Hydra's choices) the
    callback raised "HydraConfig was not set" before Hydra set it, and its checks never ran."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from cl_bench.recording.hydra_record import BACKUP_SUFFIX, KeepRunRecord
    from tests.conftest import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra.run.dir={tmp_path}/run_${{run_name}}"], return_hydra_config=True)
    HydraConfig.instance().cfg = None  # as when Hydra calls the callback: before the job sets it
    record = tmp_path / "run_sft-mini-s42" / ".hydra"
    record.mkdir(parents=True)
    (record / "config.yaml").write_text("seed: 1\n")
    KeepRunRecord().on_run_start(cfg)
    assert (record.with_name(".hydra" + BACKUP_SUFFIX) / "config.yaml").read_text() == "seed: 1\n"


def test_resume_alone_reads_the_runs_recorded_command_and_lets_settings_given_now_win(tmp_path):
    from cl_bench.recording.hydra_record import with_run_overrides

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- method=ewc\n- +api_token=***\n- resume=/old\n- seed=3\n")
    argv = ["cl.py", f"resume={tmp_path}", "seed=4", "+api_token=secret"]
    assert with_run_overrides(argv) == ["cl.py", "method=ewc", *argv[1:], f"hydra.run.dir={tmp_path}"]
    for unchanged in (
        ["cl.py", "-m", f"resume={tmp_path}"],
        ["cl.py", f"resume={tmp_path}", "hydra.run.dir=x"],
        ["cl.py", f"resume={tmp_path / 'none'}"],
        ["cl.py", "seed=1"],
    ):
        assert with_run_overrides(unchanged) == unchanged


def test_a_full_disk_is_named_instead_of_the_writers_own_message(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    def torch_like(tmp):
        tmp.write_bytes(b"part")
        raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 64 vs 12")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(100, 100, 0))
    with pytest.raises(OSError, match="no space left on the device of .* while writing stage-001.pt"):
        from cl_bench.files import atomic_write

        atomic_write(tmp_path / "stage-001.pt", torch_like)
    assert list(tmp_path.iterdir()) == []


def test_taking_over_a_dir_removes_the_dead_writers_temporaries_only(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "checkpoints").mkdir(parents=True)
    stale = tmp_path / "checkpoints" / f".stage-002.pt.tmp{dead.pid}"
    live = tmp_path / f".results.json.tmp{os.getpid()}"
    stale.write_bytes(b"half"), live.write_bytes(b"being written")
    lock = RunDirLock(tmp_path)
    lock.acquire()
    lock.release()
    assert not stale.exists() and live.exists()


def test_a_failed_checkpoint_write_is_recorded_as_failed_with_its_cause(make_config, monkeypatch):
    import errno

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if Path(f).name.startswith(".stage-002.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    cfg = make_config(*SHORT)
    with pytest.raises(OSError, match="No space left"):
        run(cfg, cfg.paths.output_dir)
    res = _results(cfg.paths.output_dir)
    assert res["status"] == "failed" and "No space left on device" in res["error"] and len(res["R"]) == 3
    assert _stages(cfg.paths.output_dir) == ["stage-000.pt", "stage-001.pt"]
    assert not [p for p in Path(cfg.paths.output_dir).rglob(".*.tmp*")]


def test_an_unreadable_split_file_is_named_with_the_cause(tmp_path, monkeypatch):
    path = tmp_path / "train.json"
    path.write_text("[]")
    # root reads any file whatever its mode, so the denial is simulated where the read happens
    monkeypatch.setattr(
        Path, "read_bytes", lambda self: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
    )
    with pytest.raises(ConfigError, match=f"^{path}: cannot be read \\(Permission denied\\)$"):
        read_split(path)


def test_a_failed_write_lets_go_of_the_writers_file_so_the_failure_can_still_be_recorded(tmp_path):
    """On a full disk torch's zip writer, held by the error's frames, kept the removed temporary
    open: its space stayed taken and results.json could not say "failed" (the run read "running")."""
    import weakref

    from cl_bench.files import atomic_write

    writers = []

    class ZipWriter:  # like torch's PyTorchFileWriter: the file is open while the object lives
        def __init__(self, path):
            self.file = open(path, "wb")

    def save(tmp):
        writer = ZipWriter(tmp)
        writers.append(weakref.ref(writer))
        try:
            raise RuntimeError("basic_ios::clear: iostream error")
        finally:
            writer.file.write(b"end")  # the end-of-archive write of torch's __exit__, failing in turn
            raise RuntimeError("unexpected pos 142976 vs 142864")

    try:
        atomic_write(tmp_path / "stage-004.pt", save)
    except RuntimeError as e:  # while the error is handled, as when the run records it
        assert "unexpected pos" in str(e) and writers[0]() is None
    assert len(writers) == 1 and list(tmp_path.iterdir()) == []


def test_unwritable_folders_are_named_by_their_key_before_the_model_loads(make_config, tmp_path, monkeypatch):
    """A file where a folder must be stands in for a read-only disk (root writes any folder)."""
    from cl_bench.errors import is_user_error

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr("cl_bench.stream_run.build_model", lambda *a, **k: pytest.fail("the model loaded"))
    cfg = make_config(f"train.token_cache={blocker / 'tokenized'}")
    with pytest.raises(ConfigError, match=f"^train.token_cache {blocker / 'tokenized'} is not writable"):
        run(cfg, cfg.paths.output_dir)
    with pytest.raises(ConfigError, match=f"^run dir {blocker / 'run'} is not writable"):
        RunDirLock(blocker / "run").acquire()
    proc = run_module("runners.cl", "experiment=smoke", f"hydra.run.dir={blocker / 'run'}", timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"Error: hydra.run.dir {blocker / 'run'} is not writable (Not a directory); "
        "choose another folder or free or unlock this one"
    ]
    import errno

    assert is_user_error(OSError(errno.ENOSPC, "full")) and is_user_error(OSError(errno.EROFS, "ro"))
    assert not is_user_error(OSError(errno.EIO, "I/O error")) and not is_user_error(RuntimeError("x"))


# --- no false "finished" (issue 25.2) ------------------------------------------------------------
def test_a_task_that_would_take_no_step_is_refused_before_the_model_loads(make_config, monkeypatch):
    """batch_size 16 over 12 examples with drop_last: no optimizer step, which once ended
    "finished" with BWT 0 (perfect retention, read off a model that never trained)."""
    from cl_bench.data.batching import check_every_task_trains, steps_per_epoch

    monkeypatch.setattr("cl_bench.stream_run.build_model", lambda *a, **k: pytest.fail("the model loaded"))
    cfg = make_config("tasks.order=[arith]", "train.batch_size=16", "train.drop_last=true")
    with pytest.raises(
        ConfigError,
        match="task arith: its 12 training examples give no optimizer step at "
        "train.batch_size=16 with train.drop_last=True",
    ):
        run(cfg, cfg.paths.output_dir)
    assert not (Path(cfg.paths.output_dir) / "results.json").exists()
    cfg = make_config("tasks.order=[arith]", "train.drop_last=maybe")
    with pytest.raises(ConfigError, match="train.drop_last must be true or false, got 'maybe'"):
        run(cfg, cfg.paths.output_dir)
    with pytest.raises(ConfigError, match="the stream has no task to train"):
        check_every_task_trains([], make_config().train)
    # the sampler's own count: 12 examples in batches of 5 give 2 full steps and a rest of 2
    assert [steps_per_epoch(12, 5, d, w) for d, w in ((False, 1), (True, 1), (False, 3))] == [3, 2, 2]


class _SignalAt:
    """A method that sends this process SIGTERM at one moment of the run."""

    def __new__(cls, when, sig=signal.SIGTERM):
        from methods.sft import SFT

        class Stopper(SFT):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if when == "step" and pl_module.task_name == "code" and trainer.global_step == 2:
                    os.kill(os.getpid(), sig)

            def on_task_end(self, module, task, task_index):
                if when == "between steps" and task.name == "code":
                    os.kill(os.getpid(), sig)

        return Stopper()


@pytest.mark.parametrize(
    "when, sig", [("step", signal.SIGTERM), ("between steps", signal.SIGTERM), ("step", signal.SIGINT)]
)
def test_sigterm_stops_a_run_as_stopped_non_zero_unlocked_and_resumable(make_config, monkeypatch, capsys, when, sig):
    """SIGTERM within a training step (Lightning's handler runs first) and between steps (the
    task's end), and Ctrl-C: results.json says "stopped by signal SIGTERM" (SIGINT), the exit
    status is 143 (130), the lock is released, and the same command continues to a finished run."""
    from tests.conftest import instantiate_with

    monkeypatch.setattr("cl_bench.config.instantiate", instantiate_with(_SignalAt(when, sig)))
    cfg = make_config("tasks.order=[arith,code]", "checkpoint.every_n_steps=1")
    out = Path(cfg.paths.output_dir)
    # the handlers the run finds (a shell's background job starts with SIGINT ignored: as found)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stopped:
        run(cfg, out)
    assert stopped.value.code == 128 + sig
    results = json.loads((out / "results.json").read_text())
    # issue 37.3: the command that continues this run, not "rerun the same command" (a dated dir: a new run)
    command = f"python -m runners.cl resume={out}"
    assert (
        results["status"] == "stopped"
        and results["error"] == f"stopped by signal {sig.name}: continue it with `{command}`"
    )
    assert f"The run stopped, its finished stages kept. To continue it: {command}\n" in capsys.readouterr().out
    assert len(results["R"]) == 2 and not (out / ".lock").exists()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # put back
    monkeypatch.setattr("cl_bench.config.instantiate", instantiate_with(_SignalAt("never")))
    assert run(cfg, out).status == "finished"
    assert len(json.loads((out / "results.json").read_text())["R"]) == 3


@pytest.mark.processes
def test_a_secret_passed_as_a_setting_is_written_nowhere(tmp_path):
    """Issue 25.4: +api_token=... was redacted in results.json only; the stage checkpoints, Hydra's
    .hydra record and the loggers' files held it in plain text."""
    out = tmp_path / "run"
    proc = run_module(
        "runners.cl",
        "model=tiny_llama",
        "general=none",
        "logger=csv",
        "tasks.order=[arith]",
        "tasks.num_train=8",
        "tasks.epochs=1",
        "eval.max_examples=2",
        "+api_token=s3cret-value",
        f"+wandb_key={WANDB_KEY}",
        f"hydra.run.dir={out}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".pt" for p in files) and (out / ".hydra" / "overrides.yaml").is_file()
    assert [str(p) for p in files if b"s3cret-value" in p.read_bytes() or WANDB_KEY.encode() in p.read_bytes()] == []
    assert "api_token=<redacted>" in (out / ".hydra" / "overrides.yaml").read_text()
    assert "+wandb_key=<redacted>" in (out / ".hydra" / "overrides.yaml").read_text()


#: a W&B API key's shape (40 hex digits), under a key name no pattern of names catches
WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.processes
def test_a_secret_is_written_nowhere_by_a_run_refused_or_crashed_at_start(tmp_path):
    """Issue 37.14: a sweep's job refused at start kept +api_token=... in plain text in its .hydra
    record (redacted only once a run began), and a crash raised into Hydra printed "Error executing
    job with overrides: [...]", the token with it; +wandb_key=<a W&B key> was kept everywhere."""
    secrets = ["+api_token=s3cret-value", f"+wandb_key={WANDB_KEY}"]
    refused = run_module(
        "runners.cl",
        "-m",
        "model=tiny_llama",
        "general=none",
        "optimizer.lr=-1",
        *secrets,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "hydra.sweep.subdir=job",
    )
    crashed = run_module(
        "runners.cl",
        "model=tiny_llama",
        "general=none",
        "method._target_=math.sqrt",
        *secrets,
        f"hydra.run.dir={tmp_path / 'crash'}",
    )
    assert refused.returncode == 1 and crashed.returncode == 1 and "Traceback" in crashed.stderr
    for printed in (refused.stdout + refused.stderr, crashed.stdout + crashed.stderr):
        assert "s3cret-value" not in printed and WANDB_KEY not in printed
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert (tmp_path / "sweep" / "job" / ".hydra" / "overrides.yaml").is_file() and (
        tmp_path / "crash" / ".hydra"
    ).is_dir()
    assert [str(p) for p in files if b"s3cret-value" in p.read_bytes() or WANDB_KEY.encode() in p.read_bytes()] == []


def test_a_resume_refuses_changed_data_and_lists_every_changed_setting(make_config, tmp_path, monkeypatch):
    """Issue 25.4-5: the stream's data is part of what a resume compares (its digest); every
    difference is listed (the list was cut at 10 without saying so), before the model loads."""
    data = write_stream(tmp_path / "data", {"A": 4, "B": 4})
    tasks = "[{name: A, metric: accuracy, max_new_tokens: 4}, {name: B, metric: accuracy, max_new_tokens: 4}]"
    cfg = make_config(
        "model=tiny_llama",
        "tasks=custom",
        f"tasks.data_dir={data}",
        f"tasks.tasks={tasks}",
        "checkpoint.every_n_steps=1",
        tiny=False,
    )
    run(cfg, cfg.paths.output_dir)
    (data / "B" / "train.json").write_text(json.dumps([{"prompt": "changed?", "answer": "1"}] * 4))
    monkeypatch.setattr("cl_bench.stream_run.build_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(
        ConfigError,
        match=r"these 1 settings differ from the run's checkpoint \(the stream's data "
        r"files changed\): data_sha256",
    ):
        run(cfg, cfg.paths.output_dir)
    many = [f"optimizer.lr=0.0{k}" for k in (2,)] + [
        "eval.temperature=0.5",
        "eval.top_p=0.9",
        "train.max_ans_len=9",
        "train.max_prompt_len=99",
        "eval.batch_size=3",
        "seed=7",
        "optimizer.weight_decay=0.1",
        "scheduler.warmup_steps=2",
        "eval.max_new_tokens=3",
        "optimizer.eps=0.001",
    ]
    changed = make_config(
        "model=tiny_llama",
        "tasks=custom",
        f"tasks.data_dir={data}",
        f"tasks.tasks={tasks}",
        "checkpoint.every_n_steps=1",
        *many,
        tiny=False,
    )
    with pytest.raises(ConfigError) as refused:
        run(changed, cfg.paths.output_dir)
    message = str(refused.value)  # the 11 settings, the data's digest and the run name (it holds the seed)
    assert "these 14 settings differ" in message and "run_name (" in message and "paths.output_dir" not in message
    assert all(f"{o.split('=')[0]} (" in message for o in many) and "data_sha256" in message


def test_a_disk_that_fills_mid_run_is_named_and_the_failure_still_recorded(make_config, monkeypatch, caplog):
    """Issue 37.16: after stage 1 the disk takes no new file: the error said only "No space left on
    device", results.json stayed "running", and a lock that could not be removed hid the first error.
    Now the error names the file, the last word is written over results.json in place, and the lock
    is logged, not raised."""
    import builtins
    import errno

    from cl_bench.training.checkpointing import StreamCheckpoints

    full = {"now": False}
    real_open, save = builtins.open, StreamCheckpoints.save_stage

    def no_new_files(path, mode="r", *args, **kwargs):
        if full["now"] and ".tmp" in Path(path).name and ("w" in mode or "x" in mode):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    def filling(self, state, done):
        save(self, state, done)
        full["now"] = done >= 1

    def locked(self, missing_ok=False):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr("cl_bench.files.open", no_new_files, raising=False)
    monkeypatch.setattr(StreamCheckpoints, "save_stage", filling)
    cfg = make_config("tasks.order=[arith,code]", "logger=none")
    out = Path(cfg.paths.output_dir)
    real_unlink = Path.unlink
    monkeypatch.setattr(
        Path, "unlink", lambda p, missing_ok=False: locked(p) if p.name == ".lock" else real_unlink(p, missing_ok)
    )
    with pytest.raises(OSError, match=r"No space left on device while writing .*/predictions/after_code.json"):
        run(cfg, out)
    monkeypatch.undo()
    results = _results(out)
    assert results["status"] == "failed" and "while writing" in results["error"] and len(results["R"]) == 3  # scored
    assert "could not remove the run dir's lock" in caplog.text and "delete it by hand" in caplog.text
