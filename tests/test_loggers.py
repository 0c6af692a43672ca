"""The loggers as a run uses them: CSV, TensorBoard, W&B offline (read back), and secret redaction."""
import csv
import json
from pathlib import Path

import pytest

from cl_bench.recording.loggers import wandb_logger
from cl_bench.recording.results import REDACTED, redact
from cl_bench.stream_run import run
from tests.wandb_log import read_run


def test_redact_hides_secret_keys_only():
    cfg = {"wandb": {"api_key": "abc", "project": "p"}, "hf_token": "t", "eval": {"max_new_tokens": 5},
           "list": [{"password": "x"}], "secret": None}
    out = redact(cfg)
    assert out["wandb"] == {"api_key": REDACTED, "project": "p"}
    assert out["hf_token"] == REDACTED and out["list"][0]["password"] == REDACTED
    assert out["eval"]["max_new_tokens"] == 5 and out["secret"] is None


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


def test_tensorboard_logger_writes_events(make_config):
    cfg = make_config("logger=tensorboard", "tasks.order=[arith]")
    run(cfg, cfg.paths.output_dir)
    assert list((Path(cfg.paths.output_dir) / "tensorboard").glob("events.out.tfevents.*"))


def test_wandb_offline_run_can_be_read_back_and_holds_no_secret(make_config, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_config("logger=wandb", "tasks.order=[arith,code]", "+secrets.api_key=SHOULD-NOT-LEAK")
    recorder = run(cfg, cfg.paths.output_dir)
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
    assert logged["summary"]["cl/bwt"] == pytest.approx(recorder.cl_metrics()["bwt"]) and logged["summary"]["stage"] == 2
    assert logged["metrics"]["score/*"] == logged["metrics"]["cl/*"] == logged["metrics"]["general/*"] == "stage"
    assert logged["config"]["method_name"] == "sft" and logged["config"]["seed"] == cfg.seed
    assert any(k.startswith("R_heatmap") for row in logged["history"] for k in row)
    assert (Path(cfg.paths.output_dir) / "score_matrix.png").is_file()
    assert logged["config"]["secrets"]["api_key"] == REDACTED
    assert b"SHOULD-NOT-LEAK" not in logs[0].read_bytes()
    assert "SHOULD-NOT-LEAK" not in (Path(cfg.paths.output_dir) / "results.json").read_text()
    # rerun in the same dir: it resumes from the last checkpoint and logs to the same W&B run
    again = run(cfg, cfg.paths.output_dir)
    assert again.R == recorder.R
    # the run id as each run's own log records it (a dir started in the same second is named <id>-1)
    runs = sorted((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*/run-*.wandb"))
    ids = [read_run(path)["run_id"] for path in runs]
    assert len(runs) == 2 and ids[0] and ids[0] == ids[1]


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
