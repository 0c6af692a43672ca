"""Replay in its three modes (concat, interleave, TRACE's separate epoch): what is kept, how
often each example is trained, and the settings refused."""

import pytest

from cl_bench.data.tasks import Example, Task, TaskSpec
from cl_bench.errors import ConfigError
from cl_bench.models import tiny_llama
from cl_bench.stream_run import run
from tests.conftest import instantiate_with, tiny_module, tiny_task

TASK = tiny_task()


def _steps(sampler):
    """The global batches of an epoch, as example indices (the micro-batches of every process)."""
    return [[i.index for i in step] for step in sampler._micro_batches()]


def test_replay_keeps_the_seeded_sample_and_trains_later_tasks_with_it(tmp_path):
    import json

    from cl_bench.rng import derive_seed
    from methods.replay import Replay
    from methods.shared.importance import sample_examples

    general = tmp_path / "lima.json"
    general.write_text(json.dumps([{"prompt": "Say hi. Answer:", "answer": "hi"}]))
    method = Replay(ratio=0.25, general_data=str(general), seed=7)
    module = tiny_module(method)
    method.on_stream_start(module, None)
    assert method.training_examples(TASK, 0) == TASK.train  # nothing to replay yet, not even the general set
    method.on_task_end(module, TASK, 0)
    kept = sample_examples(TASK.train, 2, derive_seed(7, 0))  # int(0.25 * 8)
    assert method.buffer == [kept] and len(set(kept)) == 2
    second = Task(TaskSpec("u", "accuracy", 4), {"train": [Example(f"u{i}? Answer:", "x") for i in range(6)]}, 1)
    trained = method.training_examples(second, 1)
    assert trained == second.train + kept + [Example("Say hi. Answer:", "hi")]
    method.on_task_end(module, second, 1)
    restored = Replay(ratio=0.25, seed=7)
    restored.load_state_dict(method.state_dict())
    assert restored.buffer == method.buffer and len(restored.buffer[1]) == 1  # int(0.25 * 6)


def test_the_runner_trains_on_the_replayed_examples(make_config, monkeypatch):
    from methods.replay import Replay

    class Counting(Replay):
        def __init__(self):
            super().__init__(per_task=3)  # wins over the default ratio
            self.sizes = []

        def on_train_start(self, trainer, pl_module):
            self.sizes.append(len(trainer.train_dataloader.dataset))

    method = Counting()
    monkeypatch.setattr("cl_bench.config.instantiate", instantiate_with(method))
    cfg = make_config("tasks.order=[arith,code,sentiment]")
    run(cfg, cfg.paths.output_dir)
    assert method.sizes == [12, 12 + 3, 12 + 6]  # tasks.num_train=12, 3 kept of each earlier task


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"per_task": None, "ratio": None}, "method.per_task or method.ratio must be set"),
        ({"per_task": None, "ratio": 1.5}, r"method.ratio must be in \(0, 1\]"),
        ({"per_task": 0, "ratio": None}, "method.per_task must be an integer >= 1"),
    ],
)
def test_bad_replay_settings_are_refused(kwargs, message):
    from methods.replay import Replay

    with pytest.raises(ConfigError, match=message):
        Replay(**kwargs)


def test_experiment_trace_composes_traces_lwf_and_replay(make_config):
    """Issue 24.2-3: ``experiment=trace`` runs LwF and replay as TRACE does; the project's defaults otherwise."""
    trace = {"tiny": False}
    lwf = make_config("experiment=trace", "method=lwf", **trace).method
    assert (lwf.reduction, lwf.direction, lwf.teacher) == ("trace", "reverse", "copy")
    replay = make_config("experiment=trace", "method=replay", **trace).method
    assert (replay.mode, replay.sample, replay.ratio) == ("trace", "first", 0.1)
    assert make_config("method=lwf").method.reduction == "answer_mean"
    assert (make_config("method=replay").method.mode, make_config("method=replay").method.sample) == (
        "concat",
        "random",
    )
    assert (
        make_config("experiment=trace", "method=lwf", "method.reduction=answer_mean", **trace).method.reduction
        == "answer_mean"
    )


@pytest.mark.parametrize("mode", ["concat", "trace"])
def test_replay_exposure_counts_of_each_mode(make_config, monkeypatch, tmp_path, mode):
    """Issue 24.3: how often task 1's kept examples are trained over a 3-task stream with 2 epochs
    each. concat: once per epoch of every later task (2 + 2); trace: once per later task, in the
    epoch after each task (TRACE's replay.py), its own kept examples the first int(0.5 N) of its
    file; the general set once after every task, the first included."""
    import json
    from collections import Counter

    from cl_bench.data.tokenization import encode_train
    from cl_bench.stream_run import run
    from methods.replay import Replay
    from tests.conftest import instantiate_with

    class Seen(Replay):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                self.seen[tuple(ids[mask.bool()].tolist())] += 1

    general = tmp_path / "general.json"
    general.write_text(json.dumps([{"prompt": "general prompt?", "answer": "general answer"}]))
    method = Seen(ratio=0.5, mode=mode, sample="first", general_data=str(general))
    method.seen = Counter()
    monkeypatch.setattr("cl_bench.config.instantiate", instantiate_with(method))
    cfg = make_config("tasks.order=[arith,code,sentiment]", "tasks.epochs=2", "tasks.num_train=4")
    run(cfg, cfg.paths.output_dir)
    from cl_bench.run_config import build_stream

    tasks = build_stream(cfg.tasks)
    tok = tiny_llama().tokenizer

    def key(ex):
        return tuple(encode_train(tok, ex, cfg.train.max_prompt_len, cfg.train.max_ans_len)["input_ids"])

    first, rest = tasks[0].train[:2], tasks[0].train[2:]  # kept: the first int(0.5 x 4) in file order
    assert [method.seen[key(ex)] for ex in rest] == [2, 2]  # its own epochs only
    assert [method.seen[key(ex)] for ex in first] == ([2 + 4] * 2 if mode == "concat" else [2 + 2] * 2)
    gen = key(method.general[0])
    assert method.seen[gen] == (4 if mode == "concat" else 3)
    assert [[e.prompt for e in kept] for kept in method.buffer] == [[e.prompt for e in t.train[:2]] for t in tasks]


def test_interleaved_replay_puts_a_fixed_share_in_every_global_batch():
    from cl_bench.data.batching import StepBatchSampler

    sampler = StepBatchSampler([1] * 14, batch_size=4, fixed_share=(10, 1), shuffle=True, seed=3)
    pooled = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        steps = _steps(sampler)
        assert len(steps) == 4 and len(sampler) == 4  # ceil(10 own / 3 per batch)
        own = sorted(i for s in steps for i in s if i < 10)
        assert own == list(range(10))  # each own example once per epoch
        assert [sum(i >= 10 for i in s) for s in steps] == [1, 1, 1, 1]
        pooled += [i for s in steps for i in s if i >= 10]
    assert sorted(pooled) == [10, 10, 11, 11, 12, 12, 13, 13]  # the pool is cycled whole, twice in 8 draws
    halves = [
        StepBatchSampler([1] * 14, batch_size=4, rank=r, world_size=2, fixed_share=(10, 1), shuffle=True, seed=3)
        for r in (0, 1)
    ]
    sampler.set_epoch(0)
    assert [a + b for a, b in zip(*map(_steps, halves))] == _steps(sampler)
    with pytest.raises(ConfigError, match="a fixed share of 4 pooled examples per batch of 4"):
        StepBatchSampler([1] * 14, batch_size=4, fixed_share=(10, 4))


def test_interleaved_replay_runs_through_the_runner_and_refuses_a_whole_batch(make_config):
    from cl_bench.stream_run import run
    from methods.replay import Replay

    cfg = make_config(
        "method=replay", "method.mode=interleave", "method.per_task=2", "tasks.order=[arith,code,sentiment]"
    )
    assert run(cfg, cfg.paths.output_dir).status == "finished"
    method = Replay(mode="interleave", batch_share=0.9)
    with pytest.raises(ConfigError, match="method.batch_share 0.9 of train.batch_size 4 leaves no room"):
        method.check_run(make_config("method=replay"))  # at set-up, before the model loads
    method = Replay(mode="interleave", batch_share=0.3)
    method.on_stream_start(tiny_module(method), None)
    assert method.replayed_per_batch(TASK, 1) is None  # nothing kept yet
    method.on_task_end(None, TASK, 0)
    assert method.replayed_per_batch(TASK, 1) == 1  # round(0.3 x 4)
