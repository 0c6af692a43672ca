"""optimizer.reset_per_task=false: one optimizer (and scheduler) for the whole stream, as TRACE
runs it; masks that promise frozen entries keep them frozen; resume carries the optimizer."""

from pathlib import Path

import torch

from cl_bench.stream_run import run
from methods.base import CLMethod
from methods.fggm import FGGM
from tests.conftest import instantiate_with

CARRY = ["optimizer.reset_per_task=false", "tasks.order=[arith,code,sentiment]", "checkpoint.keep_stages=null"]


def _stage_weights(out_dir, stage: int) -> dict:
    return torch.load(Path(out_dir) / "checkpoints" / f"stage-{stage:03d}.pt", weights_only=True)["model"]


class _Optimizers(CLMethod):
    def __init__(self):
        self.seen = []

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.seen.append((id(opt), len(opt.state), trainer.lr_scheduler_configs[0].scheduler.last_epoch))


def test_one_optimizer_and_schedule_run_the_whole_stream(make_config, monkeypatch):
    probe = _Optimizers()
    monkeypatch.setattr("cl_bench.config.instantiate", instantiate_with(probe))
    cfg = make_config(*CARRY)
    run(cfg, cfg.paths.output_dir)
    ids, states, steps = zip(*probe.seen)
    assert len(set(ids)) == 1  # the same optimizer object for every task
    assert states[0] == 0 and all(n > 0 for n in states[1:])  # moments carried into tasks 2 and 3
    assert steps == (0, 3, 6)  # the scheduler counts on over the stream (3 steps a task)


class _FGGMKeepingMasks(FGGM):
    def __init__(self):
        super().__init__(alpha=0.7)
        self.masks = {}

    def on_task_end(self, module, task, task_index):
        if self.mask is not None:
            self.masks[task_index] = {n: m.clone() for n, m in self.mask.masks.items()}
        super().on_task_end(module, task, task_index)


def test_fggm_frozen_rows_stay_bitwise_frozen_with_carried_moments(make_config, monkeypatch):
    method = _FGGMKeepingMasks()
    monkeypatch.setattr("cl_bench.config.instantiate", instantiate_with(method))
    cfg = make_config(*CARRY)
    run(cfg, cfg.paths.output_dir)
    before, after = _stage_weights(cfg.paths.output_dir, 1), _stage_weights(cfg.paths.output_dir, 2)
    frozen_rows = 0
    for name, mask in method.masks[1].items():
        frozen = (mask == 0).expand(before[name].shape)
        assert torch.equal(after[name][frozen], before[name][frozen]), name
        frozen_rows += int(frozen.any(-1).sum()) if frozen.dim() == 2 else 0
        if (mask != 0).any():
            assert not torch.equal(after[name], before[name]), name  # the rows that train do move
    assert frozen_rows > 0


def test_a_resume_restores_the_carried_optimizer_bitwise(make_config):
    cfg = make_config(*CARRY)
    whole = run(cfg, cfg.paths.output_dir).R
    out = Path(cfg.paths.output_dir)
    final = _stage_weights(out, 3)
    for stage in (2, 3):  # unrestorable: the run goes on from stage 1 with its optimizer state
        (out / "checkpoints" / f"stage-{stage:03d}.pt").write_bytes(b"lost")
    assert run(make_config(*CARRY), out).R == whole
    resumed = _stage_weights(out, 3)
    assert all(torch.equal(resumed[k], final[k]) for k in final)


def test_reset_per_task_must_be_a_boolean(make_config):
    import pytest

    from cl_bench.errors import ConfigError

    cfg = make_config("optimizer.reset_per_task=sometimes")
    with pytest.raises(ConfigError, match="optimizer.reset_per_task must be true or false, got 'sometimes'"):
        run(cfg, cfg.paths.output_dir)
