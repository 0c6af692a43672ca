"""Scaling out: global batches over processes, DDP = one process, checkpoints and exact resume, sweeps."""

import contextlib
import json
import os
import re
import signal
import socket
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from cl_bench.data.batching import StepBatchSampler, layout
from cl_bench.data.loaders import TaskLoaders
from cl_bench.data.tasks import Example
from cl_bench.errors import ConfigError
from cl_bench.models import tiny_llama
from cl_bench.stream_run import run
from cl_bench.training.checkpointing import StreamCheckpoints
from cl_bench.training.lm import causal_lm_loss
from tests.conftest import CONF_DIR, METHOD_NAMES, TINY, compose_config, method_class
from tests.launch import run_module, spawn, start_module

KILL_IN_TASK_2 = "tests.kill_probe:in_task_2"

# --- global batch layout ------------------------------------------------------------------------


def test_layout_derives_per_process_batch_and_accumulation():
    assert layout(32, None, 4) == (8, 8, 1)
    assert layout(32, 2, 4) == (8, 2, 4)
    assert layout(4, 1, 1) == (4, 1, 4)
    with pytest.raises(ConfigError, match=r"train.batch_size \(6\) is the global batch .* divisible .* \(4 = "):
        layout(6, None, 4)
    with pytest.raises(ConfigError, match=r"train.micro_batch_size \(3\) must divide the per-process batch \(4 = "):
        layout(8, 3, 2)


def test_every_global_batch_is_split_exactly_over_processes_and_micro_batches():
    tokens = list(range(1, 25))  # 24 examples, labelled-token counts 1..24
    single = list(StepBatchSampler(tokens, batch_size=8, shuffle=True, seed=3))
    parts = [
        list(StepBatchSampler(tokens, batch_size=8, micro_batch_size=2, rank=r, world_size=2, shuffle=True, seed=3))
        for r in range(2)
    ]
    assert len(single) == 3 and all(len(p) == 6 for p in parts)
    for step in range(3):
        whole = [i.index for i in single[step]]
        split = [i.index for r in range(2) for mb in parts[r][2 * step : 2 * step + 2] for i in mb]
        assert split == whole  # rank 0 then rank 1, micro-batches in order: the same examples
        n_step = sum(tokens[i] for i in whole)
        assert {i.loss_normalizer for i in single[step]} == {n_step}
        assert {i.loss_normalizer for r in range(2) for mb in parts[r][2 * step : 2 * step + 2] for i in mb} == {
            n_step / 4
        }


def test_the_smaller_last_batch_is_shared_with_equal_micro_batch_counts():
    tokens = [1] * 11  # batch 4: two full global batches, then 3 examples
    assert [len(b) for b in StepBatchSampler(tokens, batch_size=4, micro_batch_size=2)] == [2, 2, 2, 2, 2, 1]
    parts = [list(StepBatchSampler(tokens, batch_size=4, micro_batch_size=1, rank=r, world_size=2)) for r in range(2)]
    assert [len(b) for b in parts[0]] == [1, 1, 1, 1, 2] and [len(b) for b in parts[1]] == [1, 1, 1, 1, 1]
    assert sorted(i.index for p in parts for b in p[4:] for i in b) == [8, 9, 10]
    assert {i.loss_normalizer for p in parts for b in p[4:] for i in b} == {3 / 4}  # 3 tokens / (W 2 x A 2)
    assert len(StepBatchSampler(tokens, batch_size=4, rank=1, world_size=2, drop_last=True)) == 2
    # fewer examples left than processes: they cannot be shared and are left out of the epoch
    assert len(StepBatchSampler([1] * 9, batch_size=4, rank=0, world_size=2)) == 2


def test_micro_batch_losses_add_up_to_the_global_token_mean():
    """Lightning divides each micro-batch loss by A: the summed gradient is the global batch's token mean."""
    bundle = tiny_llama(seed=0)
    examples = [Example(f"q{i}", "a" * (1 + 3 * i)) for i in range(4)]  # answers of different lengths
    whole = next(iter(TaskLoaders(bundle.tokenizer, 4, 32, 16).training(examples, seed=0)))
    micro = list(TaskLoaders(bundle.tokenizer, 4, 32, 16, micro_batch_size=1).training(examples, seed=0))
    model = bundle.model

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    expected = grads(causal_lm_loss(model, {k: v for k, v in whole.items() if k != "loss_normalizer"}))
    got = grads(sum(causal_lm_loss(model, b) / len(micro) for b in micro))
    assert len(micro) == 4
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_the_loader_resumes_mid_epoch_with_the_same_order():
    sampler = StepBatchSampler([1] * 12, batch_size=2, shuffle=True, seed=5)
    sampler.set_epoch(1)
    full = [[i.index for i in b] for b in sampler]
    it = iter(sampler)
    next(it), next(it)
    state = sampler.state_dict()
    again = StepBatchSampler([1] * 12, batch_size=2, shuffle=True, seed=5)
    again.load_state_dict(state)
    again.set_epoch(1)
    assert state == {"epoch": 1, "consumed": 2}
    assert [[i.index for i in b] for b in again] == full[2:]


# --- through the runner, in subprocesses ----------------------------------------------------------

TINY_RUN = [*TINY, "tasks.order=[arith,code,sentiment]", "tasks.num_train=16", "optimizer.eps=1.0"]


def _runner_env() -> dict[str, str]:
    return {**os.environ, "CL_BENCH_CACHE": os.environ.get("CL_BENCH_CACHE", str(Path.home() / ".cache/cl_bench"))}


def _run(args, timeout=300, check=True, real=False):
    proc = run_module("runners.cl", *args, env=_runner_env(), timeout=timeout, real=real)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _final(run_dir: Path):
    results = json.loads((run_dir / "results.json").read_text())
    stages = sorted((run_dir / "checkpoints").glob("stage-*.pt"))
    return results, torch.load(stages[-1], weights_only=True)["model"]


@contextlib.contextmanager
def children_threads():
    """This process on the thread count the runs it starts have (they inherit OMP_NUM_THREADS, 1 in
    the suite): a bitwise comparison with a run made here needs their float order. Under xdist this
    process has one thread already; alone (TEST_WORKERS=0) it has every core's, and the weights of
    every kill-and-resume comparison differed at 1e-9."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def kill_inside_task_2(args: list[str], killed: Path) -> None:
    """Run the runner in ``killed`` until it SIGKILLs itself two optimizer steps after the first step
    checkpoint of task 2 (tests/kill_probe.py), before task 2 ends."""
    proc = start_module("runners.cl", *args, f"hydra.run.dir={killed}", env=_runner_env(), prelude=KILL_IN_TASK_2)
    assert proc.wait(300) == -signal.SIGKILL, proc.stderr[-3000:]
    ckpts = killed / "checkpoints"
    steps = list(ckpts.glob("task-001-step-*.ckpt"))
    assert steps and not (ckpts / "stage-002.pt").exists(), "the kill must land inside task 2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(args, launcher: str, n: int = 2, timeout: int = 300) -> str:
    """The runner on ``n`` CPU processes (``trainer.devices=n``), started three ways.

    lightning: one process, which starts the others with Lightning's launcher (a plain command);
    torchrun: ``torchrun --standalone``; env: ``n`` processes at once with the environment torchrun
    gives its workers (no agent), forked from the preloaded server: the cheapest in the tests.
    Returns what the processes printed.
    """
    args = [*args, "trainer.accelerator=cpu", f"trainer.devices={n}", "trainer.precision=32-true"]
    if launcher == "lightning":
        out = _run(args, timeout=timeout)
        return out.stdout + out.stderr
    env = _runner_env()
    if launcher == "torchrun":
        procs = [
            start_module("torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "runners.cl", *args)
        ]
    else:
        shared = {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "WORLD_SIZE": str(n),
            "LOCAL_WORLD_SIZE": str(n),
            "GROUP_RANK": "0",
            "TORCHELASTIC_RUN_ID": "tests",
        }
        procs = [
            start_module("runners.cl", *args, env={**env, **shared, "RANK": str(r), "LOCAL_RANK": str(r)})
            for r in range(n)
        ]
    try:
        codes = [p.wait(timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, code in zip(procs, codes):
        assert code == 0, (p.stdout + p.stderr)[-5000:]
    return "".join(p.stdout + p.stderr for p in procs)


#: docs/methods.md's DDP and FSDP columns, each "yes" compared with one process: param id -> (method,
#: strategies, settings that make the method's own effect visible at this size)
SHARDED = {
    "sft": ("sft", ("ddp", "fsdp"), []),
    "replay": ("replay", ("ddp", "fsdp"), ["method.ratio=0.5"]),
    "ewc": (
        "ewc",
        ("ddp", "fsdp"),
        ["method.num_samples=4", "method.lambda_=1e9", "optimizer.lr=1e-3"],
    ),  # 5e-4 from SFT
    "mas": ("mas", ("ddp", "fsdp"), ["method.num_samples=4", "method.lambda_=1e3", "optimizer.lr=1e-3"]),
    "fggm": ("fggm", ("ddp", "fsdp"), ["method._target_=tests.ddp_probe.RecordingFGGM"]),
    "random_mask": ("random_mask", ("ddp", "fsdp"), []),
    "migu": ("migu", ("ddp", "fsdp"), []),
    "agem": ("agem", ("ddp", "fsdp"), []),
    "gem": ("gem", ("ddp", "fsdp"), ["method.per_task=4"]),  # the memory batch of each task laid out as 2 x 2
    "agft": ("agft", ("ddp", "fsdp"), ["method.num_samples=4", "method.samples=all"]),
    "lwf": ("lwf", ("ddp",), ["method.lambda_=100", "optimizer.lr=1e-3"]),  # the copy teacher
    "lwf_topk": (
        "lwf",
        ("ddp", "fsdp"),
        ["method.teacher=topk", "method.lambda_=100", "optimizer.lr=1e-3"],
    ),  # 6e-4 from SFT
    # concat: the general texts are training rows (batch mode draws per process); A = 2 x 2 rows
    "gere": (
        "gere",
        ("ddp", "fsdp"),
        ["method.mode=concat", "method.num_samples=4", "method.generate_tokens=16", "train.micro_batch_size=2"],
    ),
    "hft": ("hft", ("ddp", "fsdp"), []),
    "inclora": ("inclora", ("ddp", "fsdp"), ["model.lora.dropout=0"]),  # dropout draws per example
    "olora": ("olora", ("ddp", "fsdp"), ["model.lora.dropout=0", "method.lambda_1=5", "optimizer.lr=1e-2"]),  # 5e-3
    # the merges: each process folds its rows (FSDP), gathering a layer (OPCM) or the model (TIES) whole
    "task_arithmetic": ("task_arithmetic", ("ddp", "fsdp"), []),
    "ties": ("ties", ("ddp", "fsdp"), []),
    "magmax": ("magmax", ("ddp", "fsdp"), []),
    "opcm": ("opcm", ("ddp", "fsdp"), []),
    "fisher_merge": ("fisher_merge", ("ddp", "fsdp"), ["method.num_samples=4"]),
}


#: methods compared with one process by a test of their own: method -> strategies
OWN_COMPARISON = {"ewc_trace": {"ddp"}}  # test_trace_ewc_under_ddp_grows_each_process_s_own_fisher


def test_the_two_process_comparisons_cover_every_method_and_every_strategy_it_declares():
    """A method in conf/method/ without its comparison here, or one that declares a strategy no
    comparison runs (or drops one that a comparison still runs), fails."""
    covered = {name: set(strategies) for name, strategies in OWN_COMPARISON.items()}
    for method, strategies, _ in SHARDED.values():
        covered.setdefault(method, set()).update(strategies)
    assert sorted(covered) == METHOD_NAMES
    for name, strategies in covered.items():
        assert strategies == set(method_class(name).supported_strategies) & {"ddp", "fsdp"}, name


@pytest.mark.processes
@pytest.mark.parametrize("case", list(SHARDED))
def test_two_processes_match_one_process(case, tmp_path, cache_dir):
    """Global batch 4: 2 gloo processes x 2 examples give one process's R matrix and weights.

    The one-process run is the reference, run in this process. DDP (to 1e-6): FGGM's Fisher and
    masks are identical on both ranks; EWC and MAS add their penalty gradient to the averaged
    gradient; TRACE's EWC grows F from the reduced
    gradients; A-GEM projects with the global step gradient and the global memory-batch gradient;
    IncLoRA and O-LoRA add (and DDP wraps) a new adapter at every task, the earlier ones frozen.
    FSDP2 (trainer=fsdp: fully_shard through Lightning's ModelParallelStrategy; parameters,
    gradients and AdamW state are row shards, evaluation gathers the whole model per stage, the
    stage checkpoint gathers it on rank 0), also to 1e-6: FSDP2 reduce-scatters the gradient sum
    and clips by a norm summed over shards, a float order of its own (measured 2026-11-25: at most
    7.5e-9, O-LoRA; MIGU 2e-6 under both strategies, a row at its threshold flipping). MIGU masks
    the rows of each gradient shard; FGGM and random masking mask each gradient shard, and FGGM's
    frozen rows stay bitwise equal over task 2 (FGGM
    scores each process's rows through the sharded model and puts the row scores together); EWC and
    MAS estimate F (Omega) for each shard's rows through the sharded model, keep it and theta* as
    those rows and add the penalty's gradient to each gradient shard; LwF (teacher=topk)
    caches the teacher's logits with the gathered weights on every process; A-GEM's memory gradient
    is a reduce-scattered backward, its dot products summed over shards; HFT's frozen flags pass
    from the sharded parameters to the gathered ones; GeRe (concat) reads the decoder's hidden
    states of its rows; AGFT attributes with the gathered weights and scales each gradient shard by
    its gate rows; IncLoRA and O-LoRA create every adapter before the model is sharded, activate
    one more per task, and O-LoRA adds its term's gradient to each gradient shard from the gathered
    A matrices.
    AdamW's eps is raised to 1 so its update is proportional to the gradient: with the default
    1e-8, coordinates whose gradient is ~0 get a +-lr step whose sign is float noise.
    """
    method, strategies, settings = SHARDED[case]
    common = [
        *TINY_RUN,
        "tasks.order=[arith,code]",
        "eval.max_examples=2",
        f"method={method}",
        "train.batch_size=4",
        "checkpoint.keep_stages=null",
        *settings,
    ]
    dump = (lambda name: [f"+method.dump_dir={tmp_path / 'masks' / name}"]) if method == "fggm" else (lambda name: [])
    run(compose_config([*common, *dump("single")], tmp_path / "single", cache_dir), tmp_path / "single")
    r1, w1 = _final(tmp_path / "single")
    for strategy in strategies:
        _run_processes(
            [*common, *dump(strategy), f"hydra.run.dir={tmp_path / strategy}", f"trainer={strategy}"],
            "env",
        )
        r2, w2 = _final(tmp_path / strategy)
        # MIGU: n is summed in another order over processes, so a row at the threshold can flip (2e-6)
        atol = 2e-5 if method == "migu" else 1e-6
        assert r2["status"] == "finished" and r2["R"] == r1["R"], strategy
        assert w2.keys() == w1.keys() and not any(hasattr(v, "device_mesh") for v in w2.values())  # gathered whole
        for k in w1:
            torch.testing.assert_close(
                w2[k], w1[k], rtol=0, atol=atol, msg=lambda m, where=f"{strategy} {k}": f"{where}: {m}"
            )
        assert sorted(p.name for p in (tmp_path / strategy / "predictions").iterdir()) == [
            "after_arith.json",
            "after_code.json",
            "base.json",
        ]
        if method in ("ewc", "mas"):  # F and theta* of both processes, gathered whole into the stage checkpoint
            (f1, a1), (f2, a2) = (
                torch.load(tmp_path / d / "checkpoints" / "stage-002.pt", weights_only=True)["method"]["consolidated"][
                    0
                ]
                for d in ("single", strategy)
            )
            assert f2.keys() == f1.keys() and all(f2[n].shape == f1[n].shape for n in f1)
            for n in f1:
                torch.testing.assert_close(f2[n], f1[n], rtol=1e-4, atol=1e-9)
                torch.testing.assert_close(a2[n], a1[n], rtol=0, atol=atol)
        if method == "agft":  # the gate, kept as each shard's rows, gathered whole into the checkpoint
            g1, g2 = (
                torch.load(tmp_path / d / "checkpoints" / "stage-002.pt", weights_only=True)["method"]["gate"]
                for d in ("single", strategy)
            )
            assert g2.keys() == g1.keys() and sum(g.sum() for g in g1.values()) > 0
            for n in g1:
                torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-6)
        if method in ("inclora", "olora"):
            assert any(".task2." in k for k in w1)  # both adapters, compared above
        if method == "fggm":  # the Fisher and masks: identical on both ranks, the Fisher equal to one process's
            ranks = [torch.load(tmp_path / "masks" / strategy / f"rank{r}-task1.pt", weights_only=True) for r in (0, 1)]
            one = torch.load(tmp_path / "masks" / "single" / "rank0-task1.pt", weights_only=True)
            for n in one["masks"]:
                assert torch.equal(ranks[0]["masks"][n], ranks[1]["masks"][n])
                assert torch.equal(ranks[0]["scores"][n], ranks[1]["scores"][n])
                torch.testing.assert_close(ranks[0]["scores"][n], one["scores"][n], rtol=1e-4, atol=1e-9)
            before = torch.load(tmp_path / strategy / "checkpoints" / "stage-001.pt", weights_only=True)["model"]
            frozen = {n: ~m.bool().expand(w2[n].shape) for n, m in ranks[1]["masks"].items()}
            assert sum(f.sum() for f in frozen.values()) > 0
            assert all(torch.equal(w2[n][f], before[n][f]) for n, f in frozen.items())  # frozen rows: bitwise


@pytest.mark.processes
@pytest.mark.parametrize("launcher", ["lightning", "torchrun"])
def test_the_processes_started_by_lightning_or_torchrun_train_as_one(launcher, tmp_path, cache_dir):
    """The two ways a user starts several processes (docs/scaling.md): the plain command, whose
    first process starts the others with Lightning's launcher, and torchrun. Each starts new
    interpreters (the comparisons above start their processes as torchrun would, without its agent,
    forked from the tests' preloaded server): one short run, equal to one process's."""
    common = [*TINY_RUN, "tasks.order=[arith]", "tasks.num_train=8", "eval.max_examples=2", "train.batch_size=4"]
    run(compose_config(common, tmp_path / "single", cache_dir), tmp_path / "single")
    printed = _run_processes([*common, f"hydra.run.dir={tmp_path / launcher}", "trainer=ddp"], launcher)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in printed  # Lightning's line from the second process
    (r1, w1), (r2, w2) = _final(tmp_path / "single"), _final(tmp_path / launcher)
    assert r2["status"] == "finished" and r2["R"] == r1["R"]
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-6)


@pytest.mark.processes
def test_trace_ewc_under_ddp_grows_each_process_s_own_fisher(tmp_path, cache_dir):
    """TRACE's EWC under DDP: each process's F grows from its own micro-batch gradients, which its
    hooks see before DDP averages them. Against one process with the same micro-batches (batch 4 in
    micro-batches of 2): a process's loss is its 2 examples' tokens over half the step's, so its
    gradient is 2 c_r (c_r: its share of the step's gradient), and DDP's mean is the step's; the
    one process's micro-batch gradient is c_m. With L micro-batches per epoch (1 per step on each
    process, 2 on the one), after task 1 F_0 + F_1 = sum (2 c_0)^2 + (2 c_1)^2 over S steps
    = 8 * sum (c_0^2 + c_1^2) / 2S = 8 F_one. The weights after task 1 (no penalty yet) are the one
    process's; task 2 trains with each process's own penalty (its weights then differ by design)."""
    common = [
        *TINY_RUN,
        "tasks.order=[arith,code]",
        "eval.max_examples=2",
        "method=ewc_trace",
        "train.batch_size=4",
        "checkpoint.keep_stages=null",
        "method._target_=tests.ddp_probe.RecordingTraceEWC",
    ]
    run(
        compose_config(
            [*common, "train.micro_batch_size=2", f"+method.dump_dir={tmp_path / 'f' / 'one'}"],
            tmp_path / "one",
            cache_dir,
        ),
        tmp_path / "one",
    )
    _run_processes(
        [*common, f"+method.dump_dir={tmp_path / 'f' / 'ddp'}", f"hydra.run.dir={tmp_path / 'ddp'}", "trainer=ddp"],
        "env",
    )
    one = torch.load(tmp_path / "f" / "one" / "rank0-task0.pt", weights_only=True)
    f0, f1 = (torch.load(tmp_path / "f" / "ddp" / f"rank{r}-task0.pt", weights_only=True) for r in (0, 1))
    assert one.keys() == f0.keys() == f1.keys() and sum(f.sum() for f in one.values()) > 0
    assert not all(torch.equal(f0[n], f1[n]) for n in one)  # each process its own
    for n in one:
        torch.testing.assert_close(f0[n] + f1[n], 8 * one[n], rtol=1e-4, atol=1e-12)
    w1, w2 = (
        torch.load(tmp_path / d / "checkpoints" / "stage-001.pt", weights_only=True)["model"] for d in ("one", "ddp")
    )
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "ddp" / "results.json").read_text())["status"] == "finished"
    assert (tmp_path / "f" / "ddp" / "rank1-task1.pt").exists()


def test_a_row_mask_acts_on_the_rows_of_each_shard():
    """FSDP2 splits dim 0 in chunks of ceil(rows / processes); ParameterViews cuts a whole row mask
    to the rows each process holds and leaves a column mask whole (the DTensor path runs in
    test_two_processes_match_one_process[migu])."""
    from types import SimpleNamespace

    from cl_bench.training.parameter_views import ParameterViews
    from cl_bench.training.sharding import shard_rows

    assert [shard_rows(5, 2, i) for i in (0, 1)] == [slice(0, 3), slice(3, 5)]
    assert [shard_rows(2, 4, i) for i in range(4)] == [slice(0, 1), slice(1, 2), slice(2, 2), slice(2, 2)]

    class Shard:  # what ParameterViews reads of a DTensor parameter: its shape, mesh and local rows
        def __init__(self, whole, index, processes):
            self.shape, self.part = whole.shape, whole[shard_rows(whole.shape[0], processes, index)]
            self.device_mesh = SimpleNamespace(size=lambda: processes, get_local_rank=lambda: index)

        def dim(self):
            return len(self.shape)

        def to_local(self):
            return self.part

    whole = torch.arange(15.0).view(5, 3)
    keep = torch.tensor([True, False, True, False, True])
    for index, rows in ((0, slice(0, 3)), (1, slice(3, 5))):
        shard = Shard(whole, index, 2)
        assert torch.equal(ParameterViews.rows(shard, keep[:, None]), keep[rows, None])
        assert torch.equal(ParameterViews.rows(shard, keep[None, :3]), keep[None, :3])
        assert torch.equal(shard.part * ParameterViews.rows(shard, keep[:, None]), (whole * keep[:, None])[rows])
    odd = Shard(whole, 0, 2)
    odd.part = whole[:2]  # not the chunk FSDP2 gives process 0 of 2
    with pytest.raises(RuntimeError, match="a shard of 2 rows is not dim 0's chunk of 5 rows"):
        ParameterViews.rows(odd, keep[:, None])


@pytest.mark.processes
@pytest.mark.parametrize("method", ["ewc", "ewc_trace", "lwf", "agft", "fggm", "agem", "gem", "gere", "magmax", "opcm"])
def test_a_run_killed_mid_task_resumes_to_the_same_weights_and_scores(method, tmp_path, cache_dir):
    """EWC: state from the stage; TRACE's EWC: F mid-task; LwF: the teacher rebuilt from the stage;
    AGFT: its gate; FGGM: the mask replayed; A-GEM and GEM: the memory and the step's memory batches; GeRe:
    the general set rebuilt, its draws mid-task; MagMax: theta_0, the running maximum and theta_1,
    where task 2 restarts; OPCM: theta_0, the merge, the norms and lambda. FGGM's run also
    evaluates continually: its curve (points before the kill come from the step checkpoint) equals
    the uninterrupted run's."""
    small = {
        "gere": ["method.num_samples=4", "method.generate_tokens=16"],
        "agft": ["method.num_samples=4"],
        "fggm": ["eval.continual.every_n_steps=5", "eval.continual.max_examples=4"],
    }
    if method != "fggm":  # the kill lands in task 2, its last: a third task would only add time
        small[method] = [*small.get(method, []), "tasks.order=[arith,code]"]
    common = [
        *TINY_RUN,
        f"method={method}",
        "tasks.num_train=24",
        "train.batch_size=2",
        "checkpoint.every_n_steps=5",
        *small.get(method, []),
    ]
    with children_threads():  # uninterrupted, in this process
        run(compose_config(common, tmp_path / "whole", cache_dir), tmp_path / "whole")
    killed = tmp_path / "killed"
    kill_inside_task_2(common, killed)
    assert json.loads((killed / "results.json").read_text())["status"] == "running"
    out = _run([*common, f"resume={killed}", f"hydra.run.dir={tmp_path / 'resumed_log'}"])
    assert "Resuming task code from task-001-step-" in out.stdout
    (r1, w1), (r2, w2) = _final(tmp_path / "whole"), _final(killed)
    assert r2["status"] == "finished" and r2["R"] == r1["R"]
    untimed = [{k: v for k, v in (r.get("continual") or {}).items() if k != "seconds"} for r in (r1, r2)]
    assert untimed[0] == untimed[1] and r2.get("continual_metrics") == r1.get("continual_metrics")
    if method == "fggm":  # 12 steps a task, a point every 5 and one at its end: 3 per task
        assert r1["continual"]["training"] == [0] * 3 + [1] * 3 + [2] * 3
    for k in w1:
        assert torch.equal(w2[k], w1[k]), k


def test_an_unreadable_checkpoint_is_named_and_the_previous_one_used(tmp_path, caplog):
    ck = StreamCheckpoints(tmp_path, every_n_steps=1, keep_stages=None)
    ck.save_stage({"tasks_done": 1}, 1)
    ck.save_stage({"tasks_done": 2}, 2)
    newest = tmp_path / "checkpoints" / "stage-002.pt"
    newest.write_bytes(newest.read_bytes()[:20])  # truncated
    assert ck.latest_stage() == {"tasks_done": 1}
    assert f"checkpoint {newest} is unreadable" in caplog.text
    (tmp_path / "checkpoints" / "task-002-step-0000004.ckpt").write_bytes(b"not a checkpoint")
    assert ck.latest_step(2) is None


@pytest.mark.processes
def test_resume_refuses_changed_settings(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    run(compose_config([*TINY_RUN, "tasks.order=[arith]"], run_dir, cache_dir), run_dir)
    out = _run(
        [
            *TINY_RUN,
            "tasks.order=[arith]",
            "optimizer.lr=0.5",
            f"resume={run_dir}",
            f"hydra.run.dir={tmp_path / 'log'}",
        ],
        check=False,
    )
    assert out.returncode != 0
    assert re.search(f"cannot resume {run_dir}: these \\d+ settings differ", out.stderr)
    assert "optimizer.lr (0.0001 -> 0.5)" in out.stderr


def test_a_run_recorded_before_a_setting_moved_or_retired_still_resumes_and_groups():
    """The scheduler's _target_ moved and EWC's shard_state retired (2026-12-03): a checkpoint or a
    results.json written before reads as today's settings; any other difference is still refused."""
    from cl_bench.recording.run_results import result_settings
    from cl_bench.training.checkpointing import StreamCheckpoints

    today = {"scheduler": {"_target_": "cl_bench.training.schedules.constant_with_warmup"}, "method": {"lambda_": 1.0}}
    before = {
        "scheduler": {"_target_": "cl_bench.training.module.constant_with_warmup"},
        "method": {"lambda_": 1.0, "shard_state": True},
    }
    checkpoints = StreamCheckpoints("unused")
    checkpoints.check_resumable({"config": checkpoints.comparable(before)}, today)
    assert result_settings(before) == result_settings(today)
    with pytest.raises(ConfigError, match="1 settings differ.*method.lambda_"):
        checkpoints.check_resumable({"config": checkpoints.comparable({**before, "method": {"lambda_": 2.0}})}, today)


def test_a_run_recorded_before_a_setting_was_added_resumes_and_groups_at_the_value_it_had():
    """eval.right_threshold, eval.engine and the tiny model's initializer_range were added
    (2026-12-03) at the values every earlier run had; the vLLM engine's settings matter only where it
    runs."""
    from cl_bench.recording.run_results import result_settings
    from cl_bench.training.checkpointing import StreamCheckpoints

    tiny = {"_target_": "cl_bench.models.tiny_llama", "hidden_size": 64}
    vllm = {"dtype": "auto", "memory_fraction": 0.1}
    today = {
        "eval": {"split": "test", "right_threshold": 50, "engine": "hf", "vllm": vllm},
        "model": {**tiny, "initializer_range": 0.02},
    }
    before = {"eval": {"split": "test"}, "model": tiny}
    checkpoints = StreamCheckpoints("unused")
    checkpoints.check_resumable({"config": checkpoints.comparable(before)}, today)
    assert result_settings(before) == result_settings(today)
    other_vllm = {**today, "eval": {**today["eval"], "vllm": {**vllm, "memory_fraction": 0.3}}}
    checkpoints.check_resumable({"config": checkpoints.comparable(today)}, other_vllm)  # hf: not read
    with pytest.raises(ConfigError, match="1 settings differ.*eval.vllm.memory_fraction"):
        engine = {**today["eval"], "engine": "vllm"}
        checkpoints.check_resumable(
            {"config": checkpoints.comparable({**today, "eval": engine})},
            {**today, "eval": {**engine, "vllm": {**vllm, "memory_fraction": 0.3}}},
        )
    with pytest.raises(ConfigError, match="1 settings differ.*model.initializer_range"):
        checkpoints.check_resumable(
            {"config": checkpoints.comparable(before)}, {**today, "model": {**tiny, "initializer_range": 0.2}}
        )
    smollm2 = {"_target_": "cl_bench.models.load_smollm2"}  # not the tiny model: nothing added
    assert "model.initializer_range" not in result_settings({"model": smollm2})


@pytest.mark.processes
def test_a_sweep_runs_every_job_in_its_own_dir_survives_a_failed_one_and_reports_it(tmp_path):
    """Every job runs; the sweep ends with a table of the 8 jobs and exits 1 (4 were refused)."""
    out = _run(
        [
            "-m",
            *TINY_RUN,
            "tasks.order=[arith,code],[arith,nope]",
            "method=sft,ewc",
            "seed=1,2",
            f"hydra.sweep.dir={tmp_path}",
            "hydra.sweep.subdir=${hydra.job.num}",
        ],
        timeout=500,
        check=False,
    )
    assert out.returncode == 1 and "4 of 8 jobs did not finish" in out.stdout and "Traceback" not in out.stderr
    rows = [line.split("│")[1:4] for line in out.stdout.splitlines() if re.match(r"│ \d ", line)]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        (str(n), "finished" if n < 4 else "refused") for n in range(8)
    ]
    assert all(r[2].strip().startswith("op ") for r in rows[:4])
    jobs = [json.loads((tmp_path / str(n) / "results.json").read_text()) for n in range(8)]
    done = [j for j in jobs if j["status"] == "finished"]
    failed = [j for j in jobs if j["status"] == "refused"]  # issue 37.18: refused by its settings, as by its dir
    assert {(j["config"]["method"]["_target_"].rsplit(".", 1)[-1], j["config"]["seed"]) for j in done} == {
        ("SFT", 1),
        ("SFT", 2),
        ("EWC", 1),
        ("EWC", 2),
    }
    assert len(failed) == 4 and all("tasks.order names unknown task(s) ['nope']" in j["error"] for j in failed)
    assert (out.stdout + out.stderr).count("refused: tasks.order names unknown task(s) ['nope']") == 4


@pytest.mark.processes
def test_a_local_sweep_refuses_to_start_ddp_processes(tmp_path):
    out = _run(
        [
            "-m",
            *TINY_RUN,
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "seed=1",
            f"hydra.sweep.dir={tmp_path}",
            "hydra.sweep.subdir=job",
        ],
        check=False,
    )
    assert out.returncode == 1 and "1 of 1 jobs did not finish" in out.stdout
    result = json.loads((tmp_path / "job" / "results.json").read_text())
    assert result["status"] == "refused" and "a local multirun cannot start DDP processes" in result["error"]


@pytest.mark.processes
def test_optuna_tunes_on_the_metric_the_run_returns(tmp_path):
    _run(
        [
            "-m",
            *TINY_RUN,
            "tasks.order=[arith,code]",
            "method=fggm",
            "hydra/sweeper=tune",
            "hydra.sweeper.n_trials=2",
            "method.alpha=interval(0.5, 0.95)",
            "objective=op",
            f"hydra.sweep.dir={tmp_path}",
        ]
    )
    ops = [json.loads(p.read_text())["cl_metrics"]["op"] for p in tmp_path.glob("*/results.json")]
    best = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert len(ops) == 2 and best.best_value == max(ops) and 0.5 <= best.best_params["method.alpha"] <= 0.95


def _with_hydra(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_launchers_sweepers_and_trainers_compose_for_eight_gpus():
    cfg = _with_hydra(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 8, 8)
    assert cfg.trainer.strategy._target_ == "lightning.pytorch.strategies.DDPStrategy"
    assert _with_hydra(["hydra/launcher=local_parallel"]).hydra.launcher._target_.endswith("JoblibLauncher")
    assert _with_hydra(["hydra/sweeper=tune"]).hydra.sweeper._target_.endswith("OptunaSweeper")
    assert _with_hydra(["trainer=deepspeed"]).trainer.strategy.stage == 2
    wandb = _with_hydra(["logger=wandb", "method=fggm", "seed=3"]).logger.wandb
    assert (wandb.group, wandb.job_type, wandb.name) == ("mini-smollm2_135m", "fggm", "fggm-mini-s3")


@pytest.mark.parametrize(
    "overrides, name",
    [
        ([], "sft"),
        (["method=ewc"], "ewc"),
        (["learning=grpo"], "grpo"),
        (["learning=grpo", "method=ewc"], "grpo+ewc"),
        (["learning=self_sft"], "self_sft"),
        (["arm=grpo_ewc"], "grpo+ewc"),
    ],
)
def test_a_run_is_named_for_its_learning_paradigm_and_method(overrides, name):
    """Issue 37.2: learning=grpo with method sft was named sft-mini-s1 (a sweep over learning=sft,grpo
    made two dirs of that name) and W&B's job type said sft."""
    cfg = _with_hydra(["logger=wandb", "seed=1", *overrides])
    assert cfg.run_name == f"{name}-mini-s1"
    assert (cfg.logger.wandb.name, cfg.logger.wandb.job_type) == (cfg.run_name, name)
    assert str(cfg.hydra.run.dir).endswith(f"_{name}-mini-s1")


@pytest.mark.processes
def test_the_local_parallel_launcher_runs_jobs_in_worker_processes(tmp_path):
    """Two jobs at once in joblib's workers; each gives torch its share of the cores (issue 37.5:
    a thread per core in each process made them wait on each other), unless OMP_NUM_THREADS is set."""
    proc = run_module(
        "runners.cl",
        "-m",
        *TINY_RUN,
        "tasks.order=[arith,code]",
        "method=sft,ewc",
        "hydra/launcher=local_parallel",
        f"hydra.sweep.dir={tmp_path}",
        "hydra.sweep.subdir=${hydra.job.num}",
        env={**_runner_env(), "OMP_NUM_THREADS": ""},  # as a user's shell leaves it
        real=True,  # joblib's workers hang when the runner is forked from the preloaded server
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads((tmp_path / str(n) / "results.json").read_text())["status"] for n in (0, 1)] == ["finished"] * 2
    for n in (0, 1):
        log = (tmp_path / str(n) / "cl.log").read_text()
        assert re.search(r"torch threads: \d+ per process \(2 processes at once on \d+ cores", log), log[-2000:]


@pytest.mark.processes
def test_unit_scores_put_together_from_two_processes_rows_equal_one_process_s(tmp_path):
    """FGGM under FSDP scores its own rows; every process then gets the per-unit scores of the whole
    tensors (rows gathered, column sums added over processes, entries gathered), shaped so that
    aggregate() returns them: the mask built from them is one process's (5 rows over 2 processes: 3 + 2).
    The telemetry's overall mean of the rows adds sums and counts over the processes."""
    from methods.shared.masking import aggregate
    from tests.ddp_probe import unit_scores_worker

    spawn(unit_scores_worker, (_free_port(), str(tmp_path)))
    whole = {"w": torch.arange(35.0).view(5, 7) ** 1.5, "v": torch.arange(5.0) + 0.5}
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    mean = sum(t.sum() for t in whole.values()).double() / sum(t.numel() for t in whole.values())
    assert [r.pop("mean")["split"].item() for r in ranks] == pytest.approx([mean.item()] * 2, rel=1e-12)
    for key, got in ranks[0].items():
        how, reduce = key.split("-")
        for n, t in whole.items():
            assert torch.equal(got[n], ranks[1][key][n]), (key, n)  # the same on every process
            torch.testing.assert_close(aggregate(got[n], how, reduce), aggregate(t, how, reduce), rtol=1e-6, atol=0)


@pytest.mark.processes
def test_a_sweep_job_refused_by_its_dir_is_a_failed_row_and_the_record_is_kept(tmp_path):
    """Issue 25.2: two jobs into one dir: the first finishes, the second (another seed) is refused
    by the first's checkpoints. The table shows it refused, the sweep exits 1, and the dir keeps
    the first run's results and .hydra record."""
    out = _run(
        ["-m", *TINY_RUN, "tasks.order=[arith]", "seed=1,2", f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=same"],
        timeout=300,
        check=False,
    )
    assert out.returncode == 1 and "1 of 2 jobs did not finish" in out.stdout, out.stdout[-2000:]
    assert re.search(r"│ same +│ refused +│", out.stdout) and re.search(r"│ same +│ finished +│ op ", out.stdout)
    results = json.loads((tmp_path / "same" / "results.json").read_text())
    assert results["status"] == "finished" and results["config"]["seed"] == 1
    assert "seed=1" in (tmp_path / "same" / ".hydra" / "overrides.yaml").read_text()
    # issue 37.18: a rerun of the sweep whose every job is refused leaves the sweep's own record as it was
    record = (tmp_path / "multirun.yaml").read_text()
    again = _run(
        [
            "-m",
            *TINY_RUN,
            "tasks.order=[arith]",
            "seed=1",
            "optimizer.lr=0.5",
            f"hydra.sweep.dir={tmp_path}",
            "hydra.sweep.subdir=same",
        ],
        check=False,
    )
    assert again.returncode == 1 and re.search(r"│ same +│ refused +│", again.stdout), again.stdout[-2000:]
    assert (tmp_path / "multirun.yaml").read_text() == record and "optimizer.lr=0.5" not in record
