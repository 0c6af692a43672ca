"""Joint (multi-task) training: every example of every task once per epoch; what it refuses."""

from pathlib import Path

import pytest

from cl_bench.errors import ConfigError
from cl_bench.models import tiny_llama


def test_joint_training_trains_every_example_of_every_task_once_per_epoch(make_config, monkeypatch):
    import json
    from collections import Counter

    from cl_bench.stream_run import run
    from methods.sft import SFT
    from tests.conftest import instantiate_with

    class Seen(SFT):
        def __init__(self):
            self.seen = Counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                self.seen[tuple(ids[mask.bool()].tolist())] += 1

    method = Seen()
    monkeypatch.setattr("cl_bench.config.instantiate", instantiate_with(method))
    cfg = make_config("tasks.joint=true", "tasks.order=[arith,code]", "tasks.epochs=[2,1]")
    recorder = run(cfg, cfg.paths.output_dir)
    assert recorder.stages == ["base", "after_joint"] and len(recorder.R) == 2 and len(recorder.R[1]) == 2
    results = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert results["joint"] is True and results["status"] == "finished"
    assert results["cl_metrics"] == {"op": pytest.approx(sum(recorder.R[1]) / 2)}  # no BWT/FWT: no sequence
    from cl_bench.data.tokenization import encode_train

    tok = tiny_llama().tokenizer
    from cl_bench.run_config import build_stream

    tasks = build_stream(cfg.tasks)
    expected = Counter()
    for task, epochs in zip(tasks, (2, 1)):
        for ex in task.train:
            expected[tuple(encode_train(tok, ex, cfg.train.max_prompt_len, cfg.train.max_ans_len)["input_ids"])] += (
                epochs
            )
    assert method.seen == expected


def test_joint_training_refuses_settings_that_assume_a_sequence(make_config):
    from cl_bench.stream_run import run

    for overrides, message in [
        (["tasks.max_steps=3"], "unset tasks.max_steps"),
        (["train.shuffle=false"], "needs train.shuffle=true"),
        (["tasks.joint=yes"], "tasks.joint must be true or false"),
    ]:
        cfg = make_config("tasks.joint=true", "tasks.order=[arith,code]", *overrides)
        with pytest.raises(ConfigError, match=message):
            run(cfg, cfg.paths.output_dir)
