"""The field's baselines (issue 13): LwF, A-GEM, GeRe, AGFT and joint training, each against a
direct computation on the tiny model."""
from functools import partial
from pathlib import Path

import pytest
import torch

from cl_bench.data.loaders import TaskLoaders
from cl_bench.data.tasks import Example, Task, TaskSpec
from cl_bench.data.tokenization import IGNORE_INDEX
from cl_bench.errors import ConfigError
from cl_bench.models import tiny_llama
from cl_bench.training.lm import labelled_logits
from cl_bench.training.module import CLModule
from cl_bench.training.parameter_views import ParameterViews
from methods.shared.masking import select_parameters

TASK = Task(TaskSpec("t", "accuracy", 4), {"train": [Example(f"q{i} x{i * 3}? Answer:", f"a{i} b{i % 2}") for i in range(8)]}, 1)


def _module(method, seed=0, batch_size=4, micro_batch_size=None):
    bundle = tiny_llama(seed=seed)
    loaders = TaskLoaders(bundle.tokenizer, batch_size=batch_size, max_prompt_len=64, max_ans_len=8,
                          micro_batch_size=micro_batch_size)
    return CLModule(bundle.model, method, partial(torch.optim.AdamW, lr=1e-3), loaders=loaders)


def _penalty(module, batch):
    """The method's penalty for ``batch`` as a training step computes it."""
    module.step_logits = labelled_logits(module.model, batch)
    return module.method.penalty(module, batch, torch.tensor(0.0))


# --- LwF --------------------------------------------------------------------------------------
def _direct_kl(student, teacher, batch, temperature, reverse=False):
    """Mean over answer positions of KL between tempered full-vocabulary distributions, from the
    models' plain forward passes."""
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    answer = batch["labels"][:, 1:] != IGNORE_INDEX
    p, q = torch.softmax(t[answer] / temperature, -1), torch.softmax(s[answer] / temperature, -1)
    if reverse:
        p, q = q, p
    return (p * (p.log() - q.log())).sum(-1).mean()


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_lwf_term_is_lambda_times_the_kl_to_the_previous_model(direction):
    from methods.lwf import LwF
    method = LwF(lambda_=0.7, temperature=2.0, teacher="copy", direction=direction)
    module = _module(method)
    method.on_task_start(module, TASK, 1)  # the teacher: the model as it is now
    assert all(not p.requires_grad for p in method.teacher.parameters())
    teacher = tiny_llama(seed=0).model.eval()
    with torch.no_grad():  # the student moves away from the teacher
        for p in module.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = next(iter(module.pass_loader(TASK.train)))
    got = _penalty(module, batch)
    expected = 0.7 * _direct_kl(module.model, teacher, batch, 2.0, reverse=direction == "reverse")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert got.requires_grad and got.item() > 0


def test_lwf_top_k_over_the_whole_vocabulary_equals_the_copy_teacher():
    from methods.lwf import LwF
    copy_method = LwF(teacher="copy")
    module = _module(copy_method)
    vocab = module.model.config.vocab_size
    topk_method = LwF(teacher="topk", top_k=vocab, cache_dtype="float32")
    copy_method.on_task_start(module, TASK, 1)
    topk_method.on_task_start(module, TASK, 1)
    assert len(topk_method.cache) == len(TASK.train)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    for batch in module.loaders.training(TASK.train, seed=3):  # other batches and padding than the cache's pass
        module.method = copy_method
        a = _penalty(module, batch)
        module.method = topk_method
        b = _penalty(module, batch)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    small = LwF(teacher="topk", top_k=3)
    small.on_task_start(module, TASK, 1)
    values, ids = next(iter(small.cache.values()))
    assert values.dtype == torch.float16 and values.shape[-1] == 3 and ids.dtype == torch.int32


def test_lwf_has_no_teacher_on_the_first_task_and_refuses_bad_settings():
    from methods.lwf import LwF
    method = LwF()
    module = _module(method)
    method.on_task_start(module, TASK, 0)
    assert _penalty(module, next(iter(module.pass_loader(TASK.train)))) is None
    with pytest.raises(ConfigError, match="method.direction=reverse needs the whole teacher"):
        LwF(teacher="topk", direction="reverse")
    with pytest.raises(ConfigError, match="method.teacher must be one of"):
        LwF(teacher="cache")
    with pytest.raises(ConfigError, match="method.temperature must be > 0"):
        LwF(temperature=0)


def test_lwf_top_k_teacher_runs_the_stream(make_config):
    from cl_bench.stream_run import run
    cfg = make_config("method=lwf", "method.teacher=topk", "method.top_k=8", "tasks.order=[arith,code]")
    assert run(cfg, cfg.paths.output_dir).status == "finished"


# --- A-GEM ------------------------------------------------------------------------------------
def test_agem_projection_is_the_formula_and_removes_the_conflict():
    from methods.agem import project
    torch.manual_seed(0)
    g = [torch.randn(3, 4), torch.randn(5)]
    r = [-g[0] + 0.1 * torch.randn(3, 4), -g[1]]  # conflicting
    flat_g, flat_r = torch.cat([t.flatten() for t in g]), torch.cat([t.flatten() for t in r])
    dot, projected = project(g, r)
    assert projected and dot == pytest.approx((flat_g @ flat_r).item(), rel=1e-6)
    expected = flat_g - (flat_g @ flat_r) / (flat_r @ flat_r) * flat_r
    torch.testing.assert_close(torch.cat([t.flatten() for t in g]), expected)
    assert torch.cat([t.flatten() for t in g]) @ flat_r >= -1e-5
    aligned = [t.clone() for t in r]
    assert project(aligned, r)[1] is False and all(torch.equal(a, b) for a, b in zip(aligned, r))


def _agem_step(micro_batch_size):
    """The projected gradient of one step of task 2, the step's gradient accumulated over
    micro-batches as Lightning does (each micro-batch loss / accumulate); the step ascends the
    loss of similar data, so it conflicts with the memory's gradient."""
    from methods.agem import AGEM
    method = AGEM(per_task=6, memory_batch_size=4, seed=1)
    module = _module(method, seed=2, micro_batch_size=micro_batch_size)
    module.log_every_n_steps = 1
    method.on_stream_start(module, None)
    method.on_task_end(module, TASK, 0)
    second = Task(TaskSpec("u", "accuracy", 4), {"train": [Example(f"u{i} y? Answer:", f"z{i}") for i in range(4)]}, 1)
    micro = list(module.loaders.training(second.train, seed=0))
    for batch in micro:
        from cl_bench.training.lm import causal_lm_loss
        (-causal_lm_loss(module.model, batch) / len(micro)).backward()  # ascent: it conflicts with the memory
    step_grad = [p.grad.clone() for p in module.model.parameters()]
    views = ParameterViews(module.model)
    reference = method.reference_gradient(module, views, list(module.model.parameters()))
    assert all(torch.equal(p.grad, g) for p, g in zip(module.model.parameters(), step_grad))  # put back
    logged = {}
    module.metric_sink = lambda metrics, step: logged.update(metrics)
    method.edit_gradients(module, views)
    return module, method, step_grad, reference, [p.grad.clone() for p in module.model.parameters()], logged


def test_agem_step_projects_the_whole_gradient_and_is_the_same_under_accumulation():
    from cl_bench.training.lm import causal_lm_loss
    module, method, g, r, projected, logged = _agem_step(None)
    # the reference gradient is the token-mean loss gradient over the step's memory batch
    from methods.shared.importance import sample_examples
    from cl_bench.rng import derive_seed
    drawn = sample_examples(method.memory[0], 4, derive_seed(1, 0))
    module.model.zero_grad()
    batch = next(iter(TaskLoaders(module.loaders.tokenizer, 4, 64, 8).passes(drawn)))
    causal_lm_loss(module.model, {k: v for k, v in batch.items() if k != "loss_normalizer"}).backward()
    for ref, p in zip(r, module.model.parameters()):
        torch.testing.assert_close(ref, p.grad, rtol=1e-5, atol=1e-7)
    fg, fr = torch.cat([t.flatten() for t in g]), torch.cat([t.flatten() for t in r])
    dot = (fg @ fr).item()
    assert dot < 0
    expected = fg - dot / (fr @ fr) * fr
    torch.testing.assert_close(torch.cat([t.flatten() for t in projected]), expected, rtol=1e-5, atol=1e-6)
    assert logged["agem/memory_size"] == 6 and logged["agem/projected_fraction"] == 1.0
    _, _, g2, r2, projected2, _ = _agem_step(2)  # 2 micro-batches per step, for the task and the memory
    for a, b in zip(projected + r, projected2 + r2):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_agem_memory_is_seeded_and_restored_and_settings_are_checked():
    from methods.agem import AGEM
    method = AGEM(per_task=3, seed=4)
    module = _module(method)
    method.on_stream_start(module, None)
    method.on_task_end(module, TASK, 0)
    assert len(method.memory[0]) == 3 and set(method.memory[0]) <= set(TASK.train)
    restored = AGEM(per_task=3, seed=4)
    restored.load_state_dict(method.state_dict())
    assert restored.memory == method.memory
    with pytest.raises(ConfigError, match="method.per_task must be an integer >= 1"):
        AGEM(per_task=0)
    bad = AGEM(memory_batch_size=6)
    with pytest.raises(ConfigError, match=r"method.memory_batch_size \(6\) must be laid out"):
        bad.on_stream_start(_module(bad, micro_batch_size=4, batch_size=8), None)



def test_lwf_trace_reduction_is_traces_kd_loss_over_every_position():
    """Issue 24.2: ``reduction: trace`` restated from TRACE's model/Regular/LwF.py: the new and the
    previous model's logits of the whole padded batch, ``F.kl_div(log_softmax(prev / T),
    softmax(new / T), reduction="batchmean")``, added with weight 1."""
    import torch.nn.functional as F
    from methods.lwf import LwF
    from cl_bench.data.tokenization import position_ids
    from cl_bench.training.lm import sequence_and_labelled_logits
    method = LwF(teacher="copy", direction="reverse", reduction="trace")
    module = _module(method)
    method.on_task_start(module, TASK, 1)
    teacher = tiny_llama(seed=0).model.eval()
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = next(iter(module.pass_loader([Example("q" + " x" * (3 * i), f"a{i} b") for i in range(4)])))
    assert (batch["attention_mask"] == 0).any()  # padding positions are part of TRACE's sum
    module.step_sequence_logits, *pair = sequence_and_labelled_logits(module.model, batch)
    module.step_logits = tuple(pair)
    got = method.penalty(module, batch, torch.tensor(0.0))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "position_ids": position_ids(batch["attention_mask"])}
    new_logits = module.model(**inputs).logits
    with torch.no_grad():
        prev_logits = teacher(**inputs).logits
    T = 2.0
    expected = F.kl_div(F.log_softmax(prev_logits / T, dim=-1), F.softmax(new_logits / T, dim=-1), reduction="batchmean")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    # the project's default on the same batch: the answer positions' mean, a much smaller term
    answer = LwF(teacher="copy", direction="reverse")
    answer.teacher = method.teacher
    assert answer.penalty(module, batch, torch.tensor(0.0)).item() * 5 < got.item()
    with pytest.raises(ConfigError, match="method.reduction=trace needs the teacher's logits at every position"):
        LwF(teacher="topk", reduction="trace")


def test_experiment_trace_composes_traces_lwf_and_replay(make_config):
    """Issue 24.2-3: ``experiment=trace`` runs LwF and replay as TRACE does; the project's defaults otherwise."""
    trace = {"tiny": False}
    lwf = make_config("experiment=trace", "method=lwf", **trace).method
    assert (lwf.reduction, lwf.direction, lwf.teacher) == ("trace", "reverse", "copy")
    replay = make_config("experiment=trace", "method=replay", **trace).method
    assert (replay.mode, replay.sample, replay.ratio) == ("trace", "first", 0.1)
    assert make_config("method=lwf").method.reduction == "answer_mean"
    assert (make_config("method=replay").method.mode, make_config("method=replay").method.sample) == ("concat", "random")
    assert make_config("experiment=trace", "method=lwf", "method.reduction=answer_mean", **trace).method.reduction == "answer_mean"


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
    key = lambda ex: tuple(encode_train(tok, ex, cfg.train.max_prompt_len, cfg.train.max_ans_len)["input_ids"])
    first, rest = tasks[0].train[:2], tasks[0].train[2:]  # kept: the first int(0.5 x 4) in file order
    assert [method.seen[key(ex)] for ex in rest] == [2, 2]  # its own epochs only
    assert [method.seen[key(ex)] for ex in first] == ([2 + 4] * 2 if mode == "concat" else [2 + 2] * 2)
    gen = key(method.general[0])
    assert method.seen[gen] == (4 if mode == "concat" else 3)
    assert [[e.prompt for e in kept] for kept in method.buffer] == [[e.prompt for e in t.train[:2]] for t in tasks]

# --- AGFT -------------------------------------------------------------------------------------
def _brute_force_lrp(w1, w2, x, picks, eps):
    """LRP-epsilon relevance of the weights of relu(x W1^T) W2^T for sum_t z2[t, picks[t]], layer
    by layer with the textbook rule R_i = sum_j x_i w_ji / (z_j + eps sign z_j) R_j."""
    stab = lambda z: z + eps * torch.where(z >= 0, 1.0, -1.0)
    z1 = x @ w1.T
    a1 = z1.clamp(min=0)
    z2 = a1 @ w2.T
    r2 = torch.zeros_like(z2)
    r2[torch.arange(len(picks)), picks] = z2[torch.arange(len(picks)), picks]
    c2 = r2 / stab(z2)                                   # [T, d2]
    rw2 = torch.einsum("tj,ji,ti->ji", c2, w2, a1)       # relevance of each W2 entry, summed over tokens
    ra1 = a1 * (c2 @ w2)                                 # relevance of the hidden units
    c1 = ra1 / stab(z1)                                  # relu passes relevance unchanged: R(z1) = R(a1)
    rw1 = torch.einsum("tj,ji,ti->ji", c1, w1, x)
    return rw1, rw2


@pytest.mark.parametrize("eps", [0.0, 0.5])
def test_agft_relevance_is_lrp_epsilon_on_a_tiny_relu_network(eps):
    from methods.agft import epsilon_rule, weight_relevance
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7, bias=False), torch.nn.ReLU(), torch.nn.Linear(7, 4, bias=False))
    x, picks = torch.randn(3, 5), torch.tensor([0, 2, 3])
    with epsilon_rule(net, eps):
        out = net(x)[torch.arange(3), picks].sum()
        got = weight_relevance(out, {"w1": net[0].weight, "w2": net[2].weight})
    rw1, rw2 = _brute_force_lrp(net[0].weight.detach(), net[2].weight.detach(), x, picks, eps)
    torch.testing.assert_close(got["w1"], rw1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["w2"], rw2, rtol=1e-5, atol=1e-6)
    if eps == 0:  # conservation: the weights' relevance of a layer sums to the output (no bias)
        assert got["w2"].sum().item() == pytest.approx(out.item(), rel=1e-5)


def test_agft_top_k_mean_and_the_per_sample_pass_match_a_direct_computation():
    from methods.agft import AGFT, TopKMean, epsilon_rule, weight_relevance
    torch.manual_seed(1)
    rows = torch.randn(7, 3, 2)
    top = TopKMean({"w": torch.Size([3, 2])}, 3, "cpu")
    for r in rows:
        top.add({"w": r})
    torch.testing.assert_close(top.mean()["w"], rows.sort(0, descending=True).values[:3].mean(0))
    method = AGFT(num_samples=8, top_k=3, samples="all", param_patterns=["*layers.0.mlp.*"])
    module = _module(method)
    method.on_stream_start(module, None)
    params = select_parameters(module.model, method.param_patterns, "method.param_patterns")
    got, used = method.relevance(module, TASK.train[:4], params)
    assert used == 4
    model, expected = module.model.eval(), []
    for ex in TASK.train[:4]:  # each sample alone, no padding
        batch = next(iter(TaskLoaders(module.loaders.tokenizer, 1, 64, 8).passes([ex])))
        with epsilon_rule(model, 1e-6):
            logits, targets = labelled_logits(model, batch)
            rel = weight_relevance(logits.max(-1).values[targets != IGNORE_INDEX].sum(), params)
        expected.append({n: torch.log1p(r.abs() / r.abs().mean()) for n, r in rel.items()})
    for n in params:
        stacked = torch.stack([e[n] for e in expected]).sort(0, descending=True).values
        torch.testing.assert_close(got[n], stacked[:3].mean(0), rtol=1e-4, atol=1e-6)


def _gated_module(scale):
    """An AGFT module after one task, its gate a known random field, ready to train task 2."""
    from methods.agft import AGFT
    method = AGFT(scale=scale, samples="all", num_samples=2, param_patterns=["*layers.0.self_attn.q_proj.weight"])
    module = _module(method)
    method.on_stream_start(module, None)
    method.on_task_end(module, TASK, 0)
    first = dict(method.gate)
    assert all(0 <= g.min() and g.max() <= 1 for g in first.values())
    method.on_task_end(module, TASK, 1)  # the same task again: the running max keeps the larger entry
    for n in first:
        assert torch.equal(method.gate[n], torch.maximum(first[n], method.gate[n]))
    method.gate = {n: torch.rand_like(g) for n, g in method.gate.items()}
    return method, module


def test_agft_scales_the_gradient_by_one_minus_the_gate():
    method, module = _gated_module("grad")
    batch = next(iter(module.pass_loader(TASK.train)))
    from cl_bench.training.lm import causal_lm_loss
    causal_lm_loss(module.model, batch).backward()
    plain = {n: p.grad.clone() for n, p in module.model.named_parameters()}
    module.model.zero_grad(set_to_none=True)
    method.on_task_start(module, TASK, 1)
    causal_lm_loss(module.model, batch).backward()
    method.edit_gradients(module, ParameterViews(module.model))
    for n, p in module.model.named_parameters():
        expected = plain[n] * (1 - method.gate[n]) if n in method.gate else plain[n]
        torch.testing.assert_close(p.grad, expected)


def test_agft_update_scaling_applies_one_minus_the_gate_to_the_optimizer_step():
    from types import SimpleNamespace
    method, module = _gated_module("update")
    name = next(iter(method.gate))
    param = dict(module.model.named_parameters())[name]
    batch = next(iter(module.pass_loader(TASK.train)))
    from cl_bench.training.lm import causal_lm_loss

    def step(scaled):
        module.model.load_state_dict(start)
        opt = torch.optim.AdamW(module.model.parameters(), lr=1e-2)
        if scaled:
            method.on_train_start(SimpleNamespace(optimizers=[opt]), module)
        module.model.zero_grad(set_to_none=True)
        causal_lm_loss(module.model, batch).backward()
        opt.step()
        method.on_train_end(None, module)
        return param.detach().clone()
    start = {k: v.clone() for k, v in module.model.state_dict().items()}
    before = start[name]
    plain, scaled = step(False), step(True)
    torch.testing.assert_close(scaled - before, (1 - method.gate[name]) * (plain - before), rtol=1e-5, atol=1e-8)



def _adam_updates(method, steps=5):
    """|theta - theta_0| of every gated entry after ``steps`` AdamW steps on TASK from the same start,
    with ``method``'s gate applied as a training run applies it (None: SFT)."""
    from types import SimpleNamespace
    from cl_bench.training.lm import causal_lm_loss
    module = _module(method)
    name = "model.layers.0.self_attn.q_proj.weight"
    param = dict(module.model.named_parameters())[name]
    start = param.detach().clone()
    opt = torch.optim.AdamW(module.model.parameters(), lr=1e-3, weight_decay=0.0)
    if method.name == "agft":
        method.on_stream_start(module, None)
        method.gate = {name: torch.full_like(param, 0.5)}
        method.on_task_start(module, TASK, 1)
        method.on_train_start(SimpleNamespace(optimizers=[opt]), module)
    for batch in list(module.pass_loader(TASK.train))[:1] * steps:
        module.model.zero_grad(set_to_none=True)
        causal_lm_loss(module.model, batch).backward()
        method.edit_gradients(module, ParameterViews(module.model))
        opt.step()
    if method.name == "agft":
        method.on_train_end(None, module)
    return (param.detach() - start).abs()


def test_agft_default_halves_the_adamw_update_of_an_entry_gated_at_one_half():
    """Issue 24.1: the default realises 'smaller updates' under AdamW; the literal gradient gate does
    not (Adam divides the scale away: the update is SFT's)."""
    from methods.agft import AGFT
    from methods.sft import SFT
    patterns = ["*layers.0.self_attn.q_proj.weight"]
    sft = _adam_updates(SFT())
    moved = sft > 1e-7
    default = _adam_updates(AGFT(param_patterns=patterns))
    literal = _adam_updates(AGFT(param_patterns=patterns, scale="grad"))
    assert (default[moved] / sft[moved]).median().item() == pytest.approx(0.5, abs=0.05)
    assert (literal[moved] / sft[moved]).median().item() == pytest.approx(1.0, abs=0.02)


def test_agft_counts_the_samples_that_formed_each_task_and_warns_when_none_did(caplog):
    """Issue 24.1: a task whose samples are never right at every token adds no gate, silently no more:
    the count is logged and reported; a looser token criterion or the task's scorer admits samples."""
    import logging
    from methods.agft import AGFT
    patterns = ["*layers.0.mlp.down_proj.weight"]
    strict = AGFT(num_samples=4, param_patterns=patterns)
    module = _module(strict)
    strict.on_stream_start(module, None)
    with caplog.at_level(logging.WARNING):
        strict.on_task_end(module, TASK, 0)  # the untrained tiny model predicts no answer right
    assert strict.report() == {"relevance_samples": {"t": 0}} and not strict.gate["model.layers.0.mlp.down_proj.weight"].any()
    assert "none of the 4 samples examined of task t" in caplog.text and "method.samples=scored" in caplog.text
    model = module.model.eval()
    shares = []
    for ex in TASK.train[:8]:
        logits, targets = labelled_logits(model, next(iter(module.pass_loader([ex]))))
        shares.append(((logits.argmax(-1) == targets)[targets != IGNORE_INDEX]).float().mean().item())
    loose = AGFT(num_samples=8, min_token_accuracy=0.0, param_patterns=patterns)
    loose.on_stream_start(module, None)
    loose.on_task_end(module, TASK, 0)
    assert loose.report()["relevance_samples"]["t"] == sum(s >= 0.0 for s in shares) == 8
    restored = AGFT(param_patterns=patterns)
    restored.on_stream_start(module, None)
    restored.load_state_dict(loose.state_dict())
    assert restored.report() == loose.report()
    # samples=scored: each sample's greedy answer scored by the task's metric (accuracy: exact match)
    from cl_bench.evaluation.generation import GenerationConfig, generate
    answers = generate(model, module.loaders.tokenizer, TASK.train, 4, GenerationConfig(batch_size=1, max_prompt_len=64))
    task = Task(TaskSpec("t", "accuracy", 4), {"train": [Example(ex.prompt, a) for ex, a in zip(TASK.train, answers)]}, 1)
    scored = AGFT(num_samples=8, samples="scored", min_score=100, param_patterns=patterns)
    scored.on_stream_start(module, None)
    scored.on_task_end(module, task, 0)  # every answer is the model's own: every sample scores 100
    assert scored.report()["relevance_samples"]["t"] == 8
    with pytest.raises(ConfigError, match="method.min_token_accuracy"):
        AGFT(min_token_accuracy=1.5)

# --- GeRe -------------------------------------------------------------------------------------
def _gere(tmp_path, **kwargs):
    import json
    from methods.gere import GeRe
    path = tmp_path / "general.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"General text number {i}: the {'quick ' * (i + 1)}fox."})
                              for i in range(5)))
    method = GeRe(general_data=str(path), **kwargs)
    module = _module(method)
    module.log_every_n_steps = 1
    logged = {}
    module.metric_sink = lambda metrics, step: logged.update(metrics)
    method.on_stream_start(module, None)
    method.on_train_start(None, module)  # the hook that reads the training pass's hidden states
    return method, module, logged


def test_gere_thresholds_are_mean_plus_minus_std_of_the_untrained_hidden_states(tmp_path):
    method, module, logged = _gere(tmp_path)
    model = module.model.eval()
    with torch.no_grad():  # the decoder's normalised output = what the lm_head reads
        hidden = torch.cat([model.model(input_ids=torch.tensor([t])).last_hidden_state[0] for t in method.texts])
        head_input = model(input_ids=torch.tensor([method.texts[0]]), output_hidden_states=True)
    mean, std = hidden.mean(0), hidden.std(0, unbiased=False)
    torch.testing.assert_close(method.lower, mean - std, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(method.upper, mean + std, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.lm_head(hidden[: len(method.texts[0])]), head_input.logits[0], rtol=1e-4, atol=1e-5)
    first = hidden[: len(method.texts[0])]
    assert torch.equal(method.bands[0] == -1, first <= method.lower) and torch.equal(method.bands[0] == 1, first >= method.upper)
    assert logged["gere/general_texts"] == 5 and logged["gere/general_tokens"] == hidden.shape[0]


def test_gere_margin_is_zero_at_the_start_and_the_hand_value_on_a_crafted_state(tmp_path):
    from methods.gere import margin_loss
    method, module, logged = _gere(tmp_path)
    batch = next(iter(module.pass_loader(TASK.train)))
    task_loss = torch.tensor(2.0)
    loss = method.training_loss(module, batch, task_loss)
    assert logged["gere/margin"] == 0.0
    torch.testing.assert_close(loss, (logged["gere/ce_general"] + task_loss) / 2)
    lower, upper = torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 1.0])
    hidden = torch.tensor([[[-0.5, 2.0], [0.5, -3.0]], [[9.0, 9.0], [0.0, 0.0]]])
    band = torch.tensor([[[-1, 0], [1, 0]], [[0, 0], [0, 0]]], dtype=torch.int8)
    mask = torch.tensor([[1, 1], [0, 1]])
    # terms: below -0.5 -> relu(-0.5+1)=0.5; inside 2 -> 1; above 0.5 -> relu(1-0.5)=0.5;
    # inside -3 -> relu(-1+3)=2; row 2 position 1 is padding; (0, 0) inside -> 0 twice
    assert margin_loss(hidden, band, lower, upper, mask).item() == pytest.approx((0.5 + 1 + 0.5 + 2) / 4)


def test_gere_dynamic_weight_carries_no_gradient(tmp_path):
    method, module, logged = _gere(tmp_path, weight="dy")
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # so that TM > 0
    batch = next(iter(module.pass_loader(TASK.train)))
    params = list(module.model.parameters())
    from cl_bench.training.lm import causal_lm_loss
    task_loss = causal_lm_loss(module.model, batch)
    dynamic = method.training_loss(module, batch, task_loss)
    w = logged["gere/weight"]
    assert logged["gere/margin"] > 0 and w == pytest.approx(((logged["gere/ce_general"] + task_loss) / 2).item()
                                                             / logged["gere/margin"], rel=1e-5)
    got = torch.autograd.grad(dynamic, params, retain_graph=True, allow_unused=True)
    method.weight = w  # the same draw (the same stream step), the weight as a constant
    task_loss = causal_lm_loss(module.model, batch)
    fixed = torch.autograd.grad(method.training_loss(module, batch, task_loss), params, allow_unused=True)
    for a, b in zip(got, fixed):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_gere_draws_cycle_through_every_text_and_follow_the_stream_step(tmp_path):
    method, module, _ = _gere(tmp_path, per_step=2)
    draws = [method.draw(step, 0, 1) for step in range(5)]  # 10 draws = two passes over the 5 texts
    flat = [i for d in draws for i in d]
    assert sorted(flat[:5]) == sorted(flat[5:]) == list(range(5))
    # a step's texts shared over 2 micro-batches: j = 0 to the first, j = 1 to the second
    assert [method.draw(3, 0, 2), method.draw(3, 1, 2)] == [[draws[3][0]], [draws[3][1]]]
    assert method.draw(3, 2, 3) == []  # more micro-batches than texts: some get none
    state = method.state_dict()
    again, _, _ = _gere(tmp_path, per_step=2)
    again.load_state_dict(state)
    assert again.draw(4, 0, 1) == draws[4]
    again.lower = again.lower + 1
    with pytest.raises(ConfigError, match="thresholds, rebuilt from the untrained model, differ"):
        again.load_state_dict(state)


@pytest.mark.parametrize("mode", ["batch", "interleave"])
def test_gere_general_texts_per_step_do_not_depend_on_the_micro_batch_size(make_config, monkeypatch, tmp_path, mode):
    """Issue 24.5: ``per_step`` general texts per optimizer step with micro-batches of 4 and of 1
    (the same global batch of 4); the rows are the authors' tokens, no BOS or EOS, up to 563."""
    import json
    from collections import Counter, defaultdict
    from cl_bench.stream_run import run
    from methods.gere import GeRe
    from tests.conftest import instantiate_with
    path = tmp_path / "general.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"General text {i}: " + "word " * (300 * (i == 0) + 3)})
                              for i in range(5)))
    seen = {}
    for micro in (4, 1):
        class Counted(GeRe):
            def training_loss(self, module, batch, task_loss):
                self.step = seen.setdefault(micro, defaultdict(Counter))[module.stream_step]
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):  # interleave: general rows
                    if tuple(ids[mask.bool()].tolist()) in self.rows:
                        self.step[self.rows[tuple(ids[mask.bool()].tolist())]] += 1
                return super().training_loss(module, batch, task_loss)

            def general_batch(self, picked, device):  # batch: the texts of the extra forward
                self.step.update(picked)
                return super().general_batch(picked, device)
        method = Counted(general_data=str(path), mode=mode, per_step=2, num_samples=5)
        monkeypatch.setattr("cl_bench.config.instantiate", instantiate_with(method))
        cfg = make_config("method=gere", f"method.mode={mode}", "tasks.order=[arith]", "train.batch_size=4",
                          f"train.micro_batch_size={micro}", "train.max_ans_len=16")
        run(cfg, tmp_path / f"run{micro}")
        assert json.loads((tmp_path / f"run{micro}" / "results.json").read_text())["status"] == "finished"
    assert seen[4] and all(sum(c.values()) == 2 for c in seen[4].values())
    if mode == "batch":  # the same texts in the same steps
        assert seen[1] == seen[4]
    else:  # two general rows in every step, whatever the layout
        assert seen[1].keys() == seen[4].keys() and all(sum(c.values()) == 2 for c in seen[1].values())
    tok = tiny_llama().tokenizer
    first = tok("General text 0: " + "word " * 303, add_special_tokens=False)["input_ids"]
    assert method.texts[0] == first[:563] and len(method.texts[0]) > 16  # not cut at train.max_ans_len
    assert tok.bos_token_id not in method.texts[0] and tok.eos_token_id not in method.texts[0]


def test_gere_batch_mode_trains_the_same_weights_at_any_micro_batch_size(make_config, tmp_path):
    """Issue 24.5: not only the texts but their weight in the step: with SGD (the update is the
    gradient), 2 steps of batch 4 in micro-batches of 4 and of 1 end at the same weights (the
    micro-batch holding the step's text carries the whole step's general terms)."""
    import torch
    from cl_bench.stream_run import run
    path = tmp_path / "general.jsonl"
    path.write_text("\n".join('{"text": "General text %d: the quick brown fox."}' % i for i in range(3)))
    weights = {}
    for micro in (4, 1):
        cfg = make_config("method=gere", f"method.general_data={path}", "method.num_samples=3", "method.per_step=1",
                          "tasks.order=[arith]", "tasks.max_steps=2", "train.batch_size=4", f"train.micro_batch_size={micro}",
                          "optimizer._target_=torch.optim.SGD", "optimizer.lr=0.5", "~optimizer.betas", "~optimizer.eps",
                          "~optimizer.fused", "trainer.gradient_clip_val=null", "eval.max_examples=1")
        run(cfg, tmp_path / f"run{micro}")
        stage = sorted((tmp_path / f"run{micro}" / "checkpoints").glob("stage-*.pt"))[-1]
        weights[micro] = torch.load(stage, weights_only=True)["model"]
    moved = weights[4]["model.layers.0.mlp.up_proj.weight"] - tiny_llama().model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert moved.abs().max() > 1e-3
    for k in weights[4]:
        torch.testing.assert_close(weights[1][k], weights[4][k], rtol=1e-4, atol=1e-6)


def test_general_texts_are_read_or_refused_with_the_file_named(tmp_path):
    from methods.shared.general_texts import read_texts
    good = tmp_path / "texts.json"
    good.write_text('["one", {"text": "two"}]')
    assert read_texts(good) == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no"}\n')
    with pytest.raises(ConfigError, match=f"{bad} record 2: expected a non-empty string"):
        read_texts(bad)
    with pytest.raises(ConfigError, match="general text file not found"):
        read_texts(tmp_path / "none.jsonl")
    from methods.gere import GeRe
    with pytest.raises(ConfigError, match="method.weight must be a number >= 0 or 'dy'"):
        GeRe(weight="auto")


def test_agft_gate_survives_a_checkpoint():
    from methods.agft import AGFT
    method, module = _gated_module("grad")
    restored = AGFT(param_patterns=["*layers.0.self_attn.q_proj.weight"])
    restored.on_stream_start(_module(restored), None)
    restored.load_state_dict(method.state_dict())
    assert restored.gate.keys() == method.gate.keys()
    assert all(torch.equal(restored.gate[n], method.gate[n]) for n in method.gate)


# --- joint training ---------------------------------------------------------------------------
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
            expected[tuple(encode_train(tok, ex, cfg.train.max_prompt_len, cfg.train.max_ans_len)["input_ids"])] += epochs
    assert method.seen == expected


def test_joint_training_refuses_settings_that_assume_a_sequence(make_config):
    from cl_bench.stream_run import run
    for overrides, message in [(["tasks.max_steps=3"], "unset tasks.max_steps"),
                               (["train.shuffle=false"], "needs train.shuffle=true"),
                               (["tasks.joint=yes"], "tasks.joint must be true or false")]:
        cfg = make_config("tasks.joint=true", "tasks.order=[arith,code]", *overrides)
        with pytest.raises(ConfigError, match=message):
            run(cfg, cfg.paths.output_dir)


# --- replay, interleaved ----------------------------------------------------------------------
def _steps(sampler):
    """The global batches of an epoch, as example indices (the micro-batches of every process)."""
    return [[i.index for i in step] for step in sampler._micro_batches()]


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
    halves = [StepBatchSampler([1] * 14, batch_size=4, rank=r, world_size=2, fixed_share=(10, 1), shuffle=True, seed=3)
              for r in (0, 1)]
    sampler.set_epoch(0)
    assert [a + b for a, b in zip(*map(_steps, halves))] == _steps(sampler)
    with pytest.raises(ConfigError, match="a fixed share of 4 pooled examples per batch of 4"):
        StepBatchSampler([1] * 14, batch_size=4, fixed_share=(10, 4))


def test_interleaved_replay_runs_through_the_runner_and_refuses_a_whole_batch(make_config):
    from cl_bench.stream_run import run
    from methods.replay import Replay
    cfg = make_config("method=replay", "method.mode=interleave", "method.per_task=2", "tasks.order=[arith,code,sentiment]")
    assert run(cfg, cfg.paths.output_dir).status == "finished"
    method = Replay(mode="interleave", batch_share=0.9)
    with pytest.raises(ConfigError, match="method.batch_share 0.9 of train.batch_size 4 leaves no room"):
        method.check_run(make_config("method=replay"))  # at set-up, before the model loads
    method = Replay(mode="interleave", batch_share=0.3)
    method.on_stream_start(_module(method), None)
    assert method.replayed_per_batch(TASK, 1) is None  # nothing kept yet
    method.on_task_end(None, TASK, 0)
    assert method.replayed_per_batch(TASK, 1) == 1  # round(0.3 x 4)


def test_agem_memory_batches_leave_no_token_cache_entries(tmp_path):
    from methods.agem import AGEM
    method = AGEM(per_task=6, seed=1)
    bundle = tiny_llama(seed=0)
    loaders = TaskLoaders(bundle.tokenizer, batch_size=4, max_prompt_len=64, max_ans_len=8, cache_dir=tmp_path)
    module = CLModule(bundle.model, method, partial(torch.optim.AdamW, lr=1e-3), loaders=loaders)
    method.on_stream_start(module, None)
    method.on_task_end(module, TASK, 0)
    for step in range(3):
        module.step_offset = step
        method.reference_gradient(module, ParameterViews(module.model), list(module.model.parameters()))
    assert list(tmp_path.iterdir()) == []


def test_gere_concat_mode_mixes_the_texts_into_the_data_and_scores_them_from_the_step_s_own_pass(tmp_path):
    """A batch of two task examples and two general texts: the loss equals (CE_general +
    CE_task) / 2 + w TM computed directly, TM from each general row's hidden state, and a batch
    without general rows keeps the task loss."""
    from cl_bench.training.lm import labelled_logits, token_cross_entropy
    from methods.gere import final_hidden, margin_loss
    method, module, logged = _gere(tmp_path, mode="concat", weight=3.0)
    assert method.training_examples(TASK, 1) == list(TASK.train) + method.examples and len(method.examples) == 5
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # so that TM > 0
    module.model.train()
    mixed = list(TASK.train[:2]) + method.examples[1:3]
    batch = next(iter(module.loaders.passes(mixed)))
    logits, targets = labelled_logits(module.model, batch)
    module.step_logits = (logits, targets)
    task_loss = token_cross_entropy(logits, targets, batch)
    loss = method.training_loss(module, batch, task_loss)

    def mean_ce(rows):
        return token_cross_entropy(logits[rows], targets[rows], {})
    ce_general, ce_task = mean_ce(slice(2, 4)), mean_ce(slice(0, 2))
    hidden = torch.cat([final_hidden(module.model, torch.tensor([method.texts[k]]), torch.ones(1, len(method.texts[k]),
                                                                                                dtype=torch.long))[0]
                        for k in (1, 2)])
    band = torch.cat([method.bands[1], method.bands[2]])
    tm = margin_loss(hidden[None], band[None], method.lower, method.upper, torch.ones(1, hidden.shape[0]))
    assert tm > 0 and logged["gere/margin"] == pytest.approx(tm.item(), rel=1e-4)
    torch.testing.assert_close(loss, (ce_general + ce_task) / 2 + 3.0 * tm, rtol=1e-4, atol=1e-5)
    plain = next(iter(module.loaders.passes(list(TASK.train[:2]))))
    module.step_logits = labelled_logits(module.model, plain)
    assert method.training_loss(module, plain, task_loss) is task_loss
