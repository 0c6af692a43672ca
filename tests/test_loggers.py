"""The loggers as a run uses them: CSV, TensorBoard, W&B offline (read back), and secret redaction."""

import csv
import sys
from pathlib import Path

import pytest

from cl_bench.errors import ConfigError
from cl_bench.recording.loggers import wandb_logger
from cl_bench.secrets import REDACTED, redact
from cl_bench.stream_run import run
from tests.wandb_log import read_run


def test_redact_hides_secret_keys_only():
    cfg = {
        "wandb": {"api_key": "abc", "project": "p"},
        "hf_token": "t",
        "eval": {"max_new_tokens": 5},
        "list": [{"password": "x"}],
        "secret": None,
    }
    out = redact(cfg)
    assert out["wandb"] == {"api_key": REDACTED, "project": "p"}
    assert out["hf_token"] == REDACTED and out["list"][0]["password"] == REDACTED
    assert out["eval"]["max_new_tokens"] == 5 and out["secret"] is None


def test_credentials_are_hidden_by_their_shape_whatever_their_key():
    """Issue 37.14: redaction went by key name only, so +wandb_key=<a W&B key> stayed in plain text."""
    from cl_bench.secrets import redact_override

    key = "0123456789abcdef0123456789abcdef01234567"
    cfg = {"wandb_key": "x", "note": key, "hub": ["hf_" + "a" * 34], "sha": "0123abcd" * 8, "run_name": "sft-mini-s1"}
    assert redact(cfg) == {
        "wandb_key": REDACTED,
        "note": REDACTED,
        "hub": [REDACTED],
        "sha": "0123abcd" * 8,
        "run_name": "sft-mini-s1",
    }
    assert redact_override(f"+my.setting={key}") == f"+my.setting={REDACTED}"
    assert redact_override("+wandb_key=abc") == f"+wandb_key={REDACTED}"
    assert redact_override("method=ewc") == "method=ewc"


def test_csv_logger_gets_one_monotonic_step_across_tasks_and_methods(make_config):
    cfg = make_config("logger=csv", "method=fggm", "tasks.order=[arith,code]", "trainer.log_every_n_steps=1")
    run(cfg, cfg.paths.output_dir)
    rows = list(csv.DictReader(open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv")))
    loss_steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert loss_steps == sorted(loss_steps) and len(set(loss_steps)) == len(loss_steps)
    assert loss_steps[-1] == 2 * 3 - 1  # two tasks x ceil(12 / 4) steps, counted from 0
    # a method's telemetry between tasks sits at the end of the previous task, not later
    assert [int(r["step"]) for r in rows if r.get("fggm/fisher_s")] == [3]
    stages = [r for r in rows if r.get("score/arith")]
    assert len(stages) == 3 and stages[-1]["cl/bwt"] != ""


def test_train_loss_is_logged_once_per_step_as_the_global_batch_mean_whatever_the_micro_batches(make_config, tmp_path):
    """Issue 25.5: with 4 micro-batches per step the loss was logged 4 times at one step, each
    micro-batch's share times 4, and a partial last batch of 2 micro-batches read twice its loss.
    12 examples at batch 8: a whole step and a partial one; the curve equals the one without
    accumulation (the same steps, the same global-batch token mean)."""
    curves = {}
    for micro in ("2", "null"):
        cfg = make_config(
            "logger=csv",
            "tasks.order=[arith]",
            "trainer.log_every_n_steps=1",
            "train.batch_size=8",
            f"train.micro_batch_size={micro}",
            f"paths.output_dir={tmp_path / micro}",
        )
        run(cfg, tmp_path / micro)
        rows = list(csv.DictReader(open(tmp_path / micro / "csv" / "metrics.csv")))
        curves[micro] = [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]
    assert [step for step, _ in curves["2"]] == [0, 1]  # one row per optimizer step
    assert [v for _, v in curves["2"]] == pytest.approx([v for _, v in curves["null"]], rel=1e-5)


def test_tensorboard_gets_the_score_matrix_and_hparams_with_the_cl_metrics(make_config):
    """Issue 25.5: hp_metric was -1 and no CL metric was attached to the hparams (the HParams tab
    could not compare methods); no score matrix reached TensorBoard. Read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    cfg = make_config("logger=tensorboard", "tasks.order=[arith,code]")
    recorder = run(cfg, cfg.paths.output_dir)
    events = EventAccumulator(
        str(Path(cfg.paths.output_dir) / "tensorboard"), size_guidance={"tensors": 0, "images": 0}
    )
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "hp_metric" not in scalars and events.Scalars("hparams/op")[-1].value == pytest.approx(
        recorder.cl_metrics()["op"]
    )
    assert [e.step for e in events.Images("R_heatmap")] == [0, 3, 6]
    text = events.Tensors("R/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert text.splitlines()[3] == f"| after_arith | {recorder.R[1][0]:.1f} | {recorder.R[1][1]:.1f} |"
    plugin = events.PluginTagToContent("hparams")
    starts = [plugin_data_pb2.HParamsPluginData.FromString(v) for v in plugin.values()]
    session = [d.session_start_info for d in starts if d.HasField("session_start_info")][-1]
    assert session.hparams["method_name"].string_value == "sft" and session.hparams["seed"].number_value == cfg.seed
    experiment = [d.experiment for d in starts if d.HasField("experiment")][-1]
    assert {m.name.tag for m in experiment.metric_infos} >= {"hparams/op", "hparams/bwt", "hparams/fwt"}


def test_wandb_offline_run_can_be_read_back_and_holds_no_secret(make_config, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_config("logger=wandb", "tasks.order=[arith,code]", "+secrets.api_key=SHOULD-NOT-LEAK")
    # W&B records the command line: a secret given there once reached its run file (issue 25.4)
    monkeypatch.setattr(sys, "argv", [sys.argv[0], "+api_token=ARGV-SHOULD-NOT-LEAK", "seed=1"])
    recorder = run(cfg, cfg.paths.output_dir)
    assert sys.argv[1] == "+api_token=ARGV-SHOULD-NOT-LEAK"  # the process's own argv is given back
    logs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    logged = read_run(logs[0])
    scores = [row for row in logged["history"] if "score/arith" in row]
    assert [row["score/arith"] for row in scores] == pytest.approx([r[0] for r in recorder.R])
    assert scores[-1]["cl/op"] == pytest.approx(recorder.cl_metrics()["op"])
    assert any("train/loss" in row for row in logged["history"])
    assert any(row.get("R", {}).get("_type") == "table-file" or "R/_type" in row for row in logged["history"])
    assert logged["config"]["model"]["_target_"] == "cl_bench.models.tiny_llama"
    # comparable in the W&B UI: summary values to sort by, stage metrics against the stage, a heatmap
    assert logged["summary"]["cl/op"] == pytest.approx(recorder.cl_metrics()["op"])
    assert (
        logged["summary"]["cl/bwt"] == pytest.approx(recorder.cl_metrics()["bwt"]) and logged["summary"]["stage"] == 2
    )
    assert logged["metrics"]["score/*"] == logged["metrics"]["cl/*"] == logged["metrics"]["general/*"] == "stage"
    assert logged["config"]["method_name"] == "sft" and logged["config"]["seed"] == cfg.seed
    assert any(k.startswith("R_heatmap") for row in logged["history"] for k in row)
    assert (Path(cfg.paths.output_dir) / "score_matrix.png").is_file()
    assert logged["config"]["secrets"]["api_key"] == REDACTED
    assert b"SHOULD-NOT-LEAK" not in logs[0].read_bytes()
    assert [
        str(p)
        for p in (Path(cfg.paths.output_dir) / "wandb").rglob("*")
        if p.is_file() and b"SHOULD-NOT-LEAK" in p.read_bytes()
    ] == []
    # the summary says how the run ended and how long it took (issue 25.5)
    assert logged["summary"]["status"] == "finished" and logged["summary"]["timings/train_s"] > 0
    assert logged["summary"]["timings/total_s"] >= logged["summary"]["timings/train_s"]
    assert "SHOULD-NOT-LEAK" not in (Path(cfg.paths.output_dir) / "results.json").read_text()
    # rerun in the same dir: it resumes from the last checkpoint and logs to the same W&B run
    again = run(cfg, cfg.paths.output_dir)
    assert again.R == recorder.R
    # the run id as each run's own log records it (a dir started in the same second is named <id>-1)
    runs = sorted((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*/run-*.wandb"))
    ids = [read_run(path)["run_id"] for path in runs]
    assert len(runs) == 2 and ids[0] and ids[0] == ids[1]


def test_a_wrong_wandb_key_is_refused_in_one_line_before_the_model_loads(make_config, monkeypatch):
    """wandb's own check (a key shorter than 40 characters fails without the network), asked when
    the loggers start: before the model loads, not at the first log call."""
    import wandb

    wandb.teardown()  # W&B keeps the mode of an earlier test's run in this process
    monkeypatch.setenv("WANDB_API_KEY", "short")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr("cl_bench.stream_run.build_model", lambda *a, **k: pytest.fail("the model loaded"))
    cfg = make_config("logger=wandb", "logger.wandb.mode=online")
    with pytest.raises(
        ConfigError,
        match=r"^logger.wandb: W&B did not accept the login \(.*40\+ characters.*"
        r"logger.wandb.mode=offline",
    ):
        run(cfg, cfg.paths.output_dir)


def test_an_unreachable_wandb_server_is_refused_naming_the_offline_switch(monkeypatch, tmp_path):
    import wandb

    seen = {}

    def login(verify, timeout):
        seen.update(verify=verify, timeout=timeout)
        raise wandb.errors.AuthenticationError("the service process is busy and did not respond in time")

    monkeypatch.setattr(wandb, "login", login)
    with pytest.raises(ConfigError, match="did not respond in time.*logger.wandb.mode=offline"):
        wandb_logger("p", str(tmp_path), mode="online", login_timeout=5)
    assert seen == {"verify": True, "timeout": 5}
    monkeypatch.setattr(wandb, "login", lambda verify, timeout: False)  # W&B offline in this process
    with pytest.raises(ConfigError, match="mode online, but W&B is not logged in"):
        wandb_logger("p", str(tmp_path), mode="online")
    with pytest.raises(ConfigError, match="logger.wandb.login_timeout"):
        wandb_logger("p", str(tmp_path), mode="online", login_timeout=0)
    # Lightning passes anonymous=None, which wandb answers with a deprecation warning on every run
    assert "anonymous" not in wandb_logger("p", str(tmp_path), mode="offline")._wandb_init


def test_wandb_mode_auto_is_offline_without_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert wandb_logger("p", str(tmp_path))._offline is True
    with pytest.raises(ValueError, match="logger.wandb.mode"):
        wandb_logger("p", str(tmp_path), mode="sometimes")


def test_a_resume_writes_the_kept_curves_back_before_it_logs_anything(tmp_path):
    """Issue 25.4: a kill right after "Resuming" once deleted csv/metrics.csv for good (Lightning's
    CSV writer deletes it when it opens and wrote the kept rows back only at its next flush)."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from cl_bench.recording.loggers import RunLoggers

    first = RunLoggers({"csv": CSVLogger(tmp_path, name="csv", version="")})
    first.log_metrics({"stage": 0, "score/a": 10.0}, 0)
    first.log_metrics({"train/loss": 2.0}, 3)
    first.log_metrics({"train/loss": 1.0}, 7)
    first.save()
    resumed = RunLoggers({"csv": CSVLogger(tmp_path, name="csv", version="")})
    resumed.continue_from(5)  # a kill right here must leave the rows before step 5 on disk
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    assert [(r["step"], r["stage"], r["train/loss"]) for r in rows] == [("0", "0.0", ""), ("3", "", "2.0")]
    assert not list((tmp_path / "csv").glob("*.before-resume"))


def test_wandb_summary_keys_general_ability_by_position_not_by_task_name(tmp_path, monkeypatch):
    """Issue 25.5: general/mean_after_<last task> named the key by the task order, so runs of two
    orders could not be compared in W&B's runs table."""
    from types import SimpleNamespace

    from cl_bench.recording.loggers import RunLoggers
    from cl_bench.recording.results import RunRecorder

    recorder = RunRecorder(tmp_path, {}, ["b", "a"], ["accuracy", "accuracy"], writes=False)
    for row, general in (([0, 0], {"x": 50.0}), ([90, 10], None), ([80, 70], {"x": 40.0})):
        recorder.add_row(row, 1.0)
        if general:
            recorder.add_general(general)
    fake = SimpleNamespace(experiment=SimpleNamespace(summary={}), log_image=lambda **kwargs: None)
    loggers = RunLoggers()
    monkeypatch.setattr(loggers, "wandb", lambda: [fake])
    loggers.log_comparison(recorder, tmp_path / "R.png", "sft", 2)
    general = {k: v for k, v in fake.experiment.summary.items() if k.startswith("general/mean")}
    assert general == {"general/mean_base": 50.0, "general/mean_stage2": 40.0, "general/mean_final": 40.0}
