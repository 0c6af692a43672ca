"""End-to-end runs of the whole stream on the tiny model."""

import json
import math
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from cl_bench.errors import ConfigError
from cl_bench.run_config import build_stream
from cl_bench.stream_run import run
from methods.base import CLMethod
from tests.conftest import instantiate_with, write_stream
from tests.launch import run_module

T = 5


def _results(out_dir):
    return json.loads((out_dir / "results.json").read_text())


def test_run_writes_the_full_matrix_and_metrics(make_config):
    cfg = make_config()
    recorder = run(cfg, cfg.paths.output_dir)
    res = _results(recorder.out_dir)
    assert res["status"] == "finished" and res["error"] is None
    assert res["tasks"] == ["sentiment", "arith", "minutes", "code", "simplify"]
    assert len(res["R"]) == T + 1 and all(len(row) == T for row in res["R"])
    assert all(0.0 <= v <= 100.0 for row in res["R"] for v in row)
    assert set(res["cl_metrics"]) == {"op", "mean_op", "bwt", "bwt_over_t", "fwt", "forgetting"}
    assert res["cl_metrics"]["op"] == pytest.approx(sum(res["R"][T][i] for i in range(T)) / T)
    assert len(res["timings"]["train_s"]) == T and len(res["timings"]["eval_s"]) == T + 1
    assert 0 < res["timings"]["cpu_s"]  # this process's CPU time (a paused or shared run's wall time is not its cost)
    assert res["config"]["model"]["_target_"] == "cl_bench.models.tiny_llama"
    csv_lines = (recorder.out_dir / "scores.csv").read_text().splitlines()
    assert csv_lines[0] == "stage,sentiment,arith,minutes,code,simplify"
    assert [line.split(",")[0] for line in csv_lines[1:]] == ["base"] + [f"after_{n}" for n in res["tasks"]]
    preds = json.loads((recorder.out_dir / "predictions" / "after_code.json").read_text())
    assert list(preds) == res["tasks"] and len(preds["arith"]) == 6
    assert {"answer", "prediction", "right"} == set(preds["arith"][0])
    assert set(res["example_forgetting"]) == set(res["tasks"][:-1])  # every task with a later stage
    assert len(list((recorder.out_dir / "predictions").glob("*.json"))) == T + 1


def test_a_run_says_its_work_at_the_start_and_each_stage_row_when_done(make_config, caplog):
    """Issue 25.5: what dominates the run's time at its start, each stage's scores as it finishes,
    and no Lightning line about its own checkpoint defaults (once doubled, at every step checkpoint)."""
    import logging

    cfg = make_config("tasks.order=[arith,code]", "checkpoint.every_n_steps=1", "heartbeat_s=null")
    stream = build_stream(cfg.tasks)
    steps = sum(math.ceil(len(t.train) / cfg.train.batch_size) * t.epochs for t in stream)
    with caplog.at_level(logging.INFO):
        recorder = run(cfg, cfg.paths.output_dir)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith(
        f"This run: 2 task(s), {steps} optimizer steps in all; 3 evaluations of the stream, "
        f"{sum(len(t.test[: cfg.eval.max_examples]) for t in stream)} generated answers each"
    )
    stage_lines = [line for line in lines if line.split(":")[0] in recorder.stages]
    assert [line.split(":")[0] for line in stage_lines] == ["base", "after_arith", "after_code"]
    assert stage_lines[2].startswith(f"after_code: arith {recorder.R[2][0]:.1f} · code {recorder.R[2][1]:.1f} · ")
    assert "stream ETA" in stage_lines[1] and "weights_only" not in caplog.text


def test_the_same_seed_gives_the_same_matrix(make_config):
    first = run(make_config("seed=7"), make_config("seed=7").paths.output_dir).R
    second = run(make_config("seed=7"), make_config("seed=7").paths.output_dir).R
    assert first == second


class _Probe(CLMethod):
    """Records what the runner hands to methods; optionally fails at a chosen task."""

    def __init__(self, fail_at=None, nan_at=None):
        self.fail_at, self.nan_at = fail_at, nan_at
        self.calls, self.optimizers = [], []

    def on_task_start(self, module, task, task_index):
        self.calls.append(("start", task.name, task_index))
        if task_index == self.fail_at:
            raise RuntimeError("boom")

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.optimizers.append((id(opt), len(opt.state)))

    def penalty(self, module, batch, task_loss):
        if module.task_name and self.nan_at == module.task_name:
            return torch.tensor(math.nan)
        return None

    def on_task_end(self, module, task, task_index):
        self.calls.append(("end", task.name, task_index))


def test_hooks_run_in_order_with_a_fresh_optimizer_per_task(make_config, monkeypatch):
    probe = _Probe()
    monkeypatch.setattr("cl_bench.config.instantiate", instantiate_with(probe))
    cfg = make_config("tasks.order=[arith,code]")
    run(cfg, cfg.paths.output_dir)
    assert probe.calls == [("start", "arith", 0), ("end", "arith", 0), ("start", "code", 1), ("end", "code", 1)]
    assert len({i for i, _ in probe.optimizers}) == 2
    assert [n for _, n in probe.optimizers] == [0, 0]  # no Adam state carried into a task


def test_a_crash_keeps_the_finished_stages(make_config, monkeypatch):
    monkeypatch.setattr("cl_bench.config.instantiate", instantiate_with(_Probe(fail_at=2)))
    cfg = make_config()
    with pytest.raises(RuntimeError, match="boom"):
        run(cfg, cfg.paths.output_dir)
    res = _results(Path(cfg.paths.output_dir))
    assert res["status"] == "failed" and res["error"] == "RuntimeError: boom"
    assert len(res["R"]) == 3  # base + two finished tasks
    assert res["stages"] == ["base", "after_sentiment", "after_arith"]


def test_a_nan_loss_stops_the_run_naming_the_task_and_keeps_results(make_config, monkeypatch):
    monkeypatch.setattr("cl_bench.config.instantiate", instantiate_with(_Probe(nan_at="minutes")))
    cfg = make_config()
    with pytest.raises(FloatingPointError, match="non-finite training loss .* task 'minutes'"):
        run(cfg, cfg.paths.output_dir)
    res = _results(Path(cfg.paths.output_dir))
    assert res["status"] == "failed" and len(res["R"]) == 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=-0.001", "optimizer.lr must be > 0"),
        ("train.batch_size=0", "train.batch_size must be an integer >= 1"),
        ("eval.max_examples=0", "eval.max_examples must be an integer >= 1 or null"),
        ("eval.split=dev", "eval.split must be one of"),
        ("tasks.epochs=[1,2]", "tasks.epochs has 2 values but the stream has 5 tasks"),
        ("tasks.order=[arith,nope]", r"tasks.order names unknown task\(s\) \['nope'\]"),
    ],
)
def test_bad_values_fail_before_anything_is_written(make_config, override, message):
    cfg = make_config(override)
    with pytest.raises(ConfigError, match=message):
        run(cfg, cfg.paths.output_dir)
    assert not (Path(cfg.paths.output_dir) / "results.json").exists()


def test_custom_stream_with_a_missing_data_dir(make_config, tmp_path):
    cfg = make_config("model=tiny_llama", "tasks=custom", f"tasks.data_dir={tmp_path / 'absent'}", tiny=False)
    with pytest.raises(ConfigError, match="tasks.data_dir does not exist"):
        run(cfg, cfg.paths.output_dir)


def test_unknown_group_option_is_refused_by_hydra(make_config):
    with pytest.raises(ConfigCompositionException, match="method"):
        make_config("method=nonexistent")


def test_cli_runs_end_to_end(tmp_path):
    out = tmp_path / "cli"
    # the README's command in a new interpreter (the one test of the interpreter's own start)
    proc = run_module(
        "runners.cl", "experiment=smoke", f"hydra.run.dir={out}", f"paths.cache_dir={tmp_path / 'cache'}", real=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _results(out)
    assert res["status"] == "finished" and len(res["R"]) == T + 1
    assert "Continual-learning metrics" in proc.stdout
    assert (out / ".hydra" / "config.yaml").is_file()
    # a log a person can read: lm-eval's progress bars (general.limit=40 runs the probe) keep one
    # line each, no carriage-return redraws, no library warning repeated at every task
    log = proc.stdout + proc.stderr
    assert "Running loglikelihood requests" in proc.stderr
    assert "\r" not in log and max(len(line) for line in log.splitlines()) <= 400
    assert "LeafSpec" not in log


def test_custom_stream_in_trace_layout_runs_end_to_end(make_config, tmp_path):
    data = write_stream(tmp_path / "data", {"TaskA": 6, "TaskB": 5})
    cfg = make_config(
        "model=tiny_llama",
        "tasks=custom",
        f"tasks.data_dir={data}",
        "tasks.order=[TaskB,TaskA]",
        "tasks.epochs=[1,2]",
        "logger=none",
        "trainer.enable_progress_bar=false",
        tiny=False,
    )
    recorder = run(cfg, cfg.paths.output_dir)
    assert recorder.task_names == ["TaskB", "TaskA"] and recorder.metric_names == ["rouge_l", "accuracy"]
    assert len(recorder.R) == 3 and recorder.status == "finished"


TRACE_TASKS = ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"]
ORDER2 = ["NumGLUE-cm", "NumGLUE-ds", "FOMC", "20Minuten", "C-STANCE", "Py150", "MeetingBank", "ScienceQA"]
EPOCHS = dict(zip(TRACE_TASKS, [5, 3, 7, 5, 3, 5, 5, 7]))


def test_trace_fixture_runs_end_to_end_with_caps(make_config, tmp_path):
    data = write_stream(tmp_path / "LLM-CL-Benchmark_500", {name: 6 for name in TRACE_TASKS})
    cfg = make_config(
        "model=tiny_llama",
        "tasks=trace",
        f"tasks.data_dir={data}",
        "tasks.max_steps=1",
        "tasks.max_examples.train=4",
        "tasks.max_examples.test=2",
        "eval.max_new_tokens=8",  # a random model seldom ends an answer: TRACE's budgets (up to 512) cost minutes
        tiny=False,
    )
    recorder = run(cfg, cfg.paths.output_dir)
    assert recorder.task_names == TRACE_TASKS and len(recorder.R) == 9 and recorder.status == "finished"
    # TRACE's own scorers by default (tasks.scorers=trace); the project's with tasks.scorers=project
    assert recorder.metric_names[2:5] == ["trace_rouge_l", "trace_edit_similarity", "trace_first_char_accuracy"]
    predictions = json.loads((Path(cfg.paths.output_dir) / "predictions" / "base.json").read_text())
    assert all(len(v) == 2 for v in predictions.values())


@pytest.mark.parametrize(
    "order, expected", [("order1", TRACE_TASKS), ("order2", ORDER2), ("[Py150,FOMC]", ["Py150", "FOMC"])]
)
def test_trace_orders_keep_each_tasks_epochs(make_config, tmp_path, order, expected):
    data = write_stream(tmp_path / "data", {name: 2 for name in TRACE_TASKS})
    stream = build_stream(
        make_config("tasks=trace", f"tasks.data_dir={data}", f"tasks.order={order}", tiny=False).tasks
    )
    assert stream.names == expected
    assert [t.epochs for t in stream] == [EPOCHS[n] for n in expected]


def test_trace_subset_keeps_the_orders_order(make_config, tmp_path):
    data = write_stream(tmp_path / "data", {name: 2 for name in TRACE_TASKS})
    cfg = make_config(
        "tasks=trace", f"tasks.data_dir={data}", "tasks.order=order2", "tasks.subset=[ScienceQA,FOMC]", tiny=False
    )
    assert build_stream(cfg.tasks).names == ["FOMC", "ScienceQA"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("tasks.order=order3", "tasks.order='order3' is not a named order; known: \\['order1', 'order2'\\]"),
        ("tasks.order=[FOMC,FOMC]", "more than once"),
        ("tasks.order=[FOMC,SST2]", "unknown task"),
        ("tasks.subset=[SST2]", "tasks.subset names task\\(s\\) \\['SST2'\\] that are not in the stream"),
        ("tasks.epochs=[1,2]", "tasks.epochs has 2 values but the stream has 8 tasks"),
        ("tasks.max_examples.train=0", "tasks.max_examples.train must be an integer >= 1"),
    ],
)
def test_bad_trace_settings_fail_before_the_model_loads(make_config, tmp_path, monkeypatch, override, message):
    data = write_stream(tmp_path / "data", {name: 2 for name in TRACE_TASKS})
    cfg = make_config("model=tiny_llama", "tasks=trace", f"tasks.data_dir={data}", override, tiny=False)
    monkeypatch.setattr("cl_bench.models.tiny_llama", lambda **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match=message):
        run(cfg, cfg.paths.output_dir)


def test_trace_with_missing_data_says_what_is_missing_and_where_to_get_it(make_config, tmp_path, monkeypatch):
    monkeypatch.delenv("TRACE_DATA_DIR", raising=False)
    cfg = make_config("model=tiny_llama", "tasks=trace", tiny=False)
    with pytest.raises(
        ConfigError, match="tasks.data_dir is not set\\nTRACE's data is not downloaded.*BeyonderXX/TRACE"
    ):
        run(cfg, cfg.paths.output_dir)
    data = write_stream(tmp_path / "data", {name: 2 for name in TRACE_TASKS[:7]})
    (data / "FOMC" / "eval.json").unlink()
    cfg = make_config("model=tiny_llama", "tasks=trace", f"tasks.data_dir={data}", tiny=False)
    with pytest.raises(ConfigError, match="missing: FOMC/eval.json, 20Minuten/\\n.*LLM-CL-Benchmark_500"):
        run(cfg, cfg.paths.output_dir)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.betas=[0.9]", r"optimizer.betas must be two numbers in \[0, 1\), got \[0.9\]"),
        ("optimizer.eps=-1", "optimizer.eps must be >= 0, got -1"),
        (
            "optimizer._target_=torch.optim.SGD",
            "optimizer: torch.optim.SGD refuses the settings under optimizer .*'betas'",
        ),
        ("seed=5000000000", r"seed must be an integer in \[0, 4294967295\], got 5000000000"),
        ("train.shuffle=maybe", "train.shuffle must be true or false, got 'maybe'"),
        ("eval.do_sample=maybe", "eval.do_sample must be true or false, got 'maybe'"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val must be >= 0 or null, got -1"),
        ("+trainer.max_epochs=3", "trainer.max_epochs is not read: each task's budget is tasks.epochs"),
        ("objective=grpo", "objective must be one of .*'op'.*got 'grpo'"),
    ],
)
def test_bad_run_settings_fail_naming_the_key_before_the_model_loads(make_config, monkeypatch, override, message):
    """Issue 25.3: settings that once failed after the model loaded (30-60 lines of traceback) or
    were accepted silently."""
    cfg = make_config(override)
    monkeypatch.setattr("cl_bench.models.tiny_llama", lambda **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match=message):
        run(cfg, cfg.paths.output_dir)


def test_an_unknown_experiment_is_refused_with_the_options():
    proc = run_module("runners.cl", "experiment=smok", "--cfg", "job", timeout=120)
    assert proc.returncode != 0 and "Could not find 'experiment/smok'" in proc.stderr
    assert "\tsmoke" in proc.stderr and "\ttrace" in proc.stderr


def test_optimizer_gets_plain_python_values(make_config):
    from cl_bench.config import optimizer_factory

    factory, reset = optimizer_factory(make_config().optimizer)
    optimizer = factory([torch.nn.Parameter(torch.zeros(2))])
    assert reset is True  # a fresh optimizer per task unless optimizer.reset_per_task=false
    assert type(optimizer.param_groups[0]["betas"]) in (list, tuple)


def test_a_dry_run_previews_every_job_of_a_sweep_and_runs_none(tmp_path):
    """Issue 25.5: the preview is made before Hydra starts: no launcher (SLURM's would submit the
    jobs), no run or sweep dir; one line per job and the settings that tell the jobs apart (it
    printed every job's whole config, 1,483 lines for 12 jobs); without -m it once crashed."""
    sweep = tmp_path / "sweep"
    proc = run_module(
        "runners.cl",
        "-m",
        "method=sft,fggm",
        "seed=1,2",
        "dry_run=true",
        "hydra/launcher=slurm",
        f"hydra.sweep.dir={sweep}",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    jobs = [line for line in lines if line.startswith("# job")]
    assert len(jobs) == 4 and jobs[3] == f"# job 3: method=fggm seed=2  ->  {sweep}/3_fggm-mini-s2"
    assert lines[0] == f"# 4 jobs (hydra/launcher=slurm hydra.sweep.dir={sweep}); nothing is run and no folder is made"
    assert (
        "seed: 1 | 2 | 1 | 2" in lines
        and "method._target_: methods.sft.SFT | methods.sft.SFT | methods.fggm.FGGM | methods.fggm.FGGM" in lines
        and "method.alpha: - | - | 0.7 | 0.7" in lines
    )
    assert len(lines) < 30 and not sweep.exists() and "submitit" not in proc.stderr
    one = run_module("runners.cl", "method=ewc", "dry_run=true", f"hydra.run.dir={tmp_path / 'one'}", timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    assert one.stdout.startswith(
        f"# one run: method=ewc dry_run=true hydra.run.dir={tmp_path / 'one'}  ->  {tmp_path / 'one'}\n"
    )
    assert "_target_: methods.ewc.EWC" in one.stdout and not (tmp_path / "one").exists()


def test_a_dry_run_of_an_optuna_sweep_shows_its_search_space():
    """Optuna picks its jobs as results come in: the preview names the sweeper and its space."""
    from runners.preview import preview

    text = preview(
        ["cl", "-m", "hydra/sweeper=tune", "method=fggm", "method.alpha=interval(0.5, 0.95)", "dry_run=true"]
    )
    assert text == (
        "# OptunaSweeper chooses its 20 jobs as results come in; nothing is run. "
        'Search space: {"method.alpha": "interval(0.5, 0.95)"}\n'
    )


def test_cpu_seconds_carry_through_a_resume_and_stay_unknown_when_a_checkpoint_lacks_them(tmp_path):
    from cl_bench.recording.results import RunRecorder

    state = RunRecorder(tmp_path, {}, ["a"], ["accuracy"], writes=False).state_dict()
    resumed = RunRecorder(tmp_path, {}, ["a"], ["accuracy"], writes=False)
    resumed.load_state_dict({**state, "cpu_s": 100.0})
    assert resumed.to_dict()["timings"]["cpu_s"] >= 100.0
    older = {k: v for k, v in state.items() if k != "cpu_s"}  # a checkpoint from before cpu_s existed
    resumed.load_state_dict(older)
    assert resumed.to_dict()["timings"]["cpu_s"] is None and resumed.state_dict()["cpu_s"] is None


def test_a_task_capped_by_max_steps_says_so_and_its_bar_counts_the_steps_it_trains(make_config, capsys):
    """Issue 37.8: under tasks.max_steps the banner said "2 epoch(s)" and the bar ended at 4/16."""
    from types import SimpleNamespace

    from cl_bench.training.trainer import TaskProgressBar

    cfg = make_config("tasks.order=[arith]", "tasks.epochs=2", "tasks.max_steps=2", "train.batch_size=2")
    run(cfg, cfg.paths.output_dir)
    assert "arith (12 examples, 2 epoch(s), at most 2 optimizer steps (tasks.max_steps)" in capsys.readouterr().out
    bar = TaskProgressBar()
    bar._trainer = SimpleNamespace(
        max_epochs=2, max_steps=4, global_step=0, num_training_batches=16, accumulate_grad_batches=1
    )
    assert bar.total_train_batches == 4
    bar._trainer.accumulate_grad_batches, bar._trainer.global_step = 2, 3  # 1 step of 2 micro-batches left
    assert bar.total_train_batches == 2
    bar._trainer.max_steps = -1  # no cap: the epoch's batches
    assert bar.total_train_batches == 16
