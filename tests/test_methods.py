"""Each method's mechanism, exactly, on the tiny model; and every method through the runner."""
import json
import math
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cl_bench.errors import ConfigError
from cl_bench.models import tiny_llama
from cl_bench.training.lm import causal_lm_loss
from cl_bench.training.module import CLModule
from cl_bench.training.parameter_views import ParameterViews
from cl_bench.data.tasks import Example, Task, TaskSpec
from cl_bench.data.loaders import TaskLoaders
from methods.ewc import EWC
from methods.ewc_trace import TraceEWC
from methods.fggm import FGGM
from methods.hft import HFT
from methods.mas import MAS
from methods.shared.masking import GradientMask, aggregate
from methods.migu import MIGU
from methods.random_mask import RandomMask
from cl_bench.stream_run import run
from tests.conftest import ROOT, TINY, instantiate_with

TASK = Task(TaskSpec("t", "accuracy", 4), {"train": [Example(f"q{i} x{i * 3}? Answer:", f"a{i}") for i in range(8)]}, 1)


def _module(method, seed=0):
    bundle = tiny_llama(seed=seed)
    loaders = TaskLoaders(bundle.tokenizer, batch_size=4, max_prompt_len=64, max_ans_len=8)
    return CLModule(bundle.model, method, partial(torch.optim.AdamW, lr=1e-3), loaders=loaders)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mask", [
    torch.tensor([[True], [False], [True]]),              # rows
    torch.tensor([[False, True, True, False]]),           # columns
    torch.tensor([[True, False, True, False]] * 3),       # elements
], ids=["row", "column", "element"])
def test_gradient_mask_zeroes_exactly_the_masked_entries(mask):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3, 4))
    x = torch.randn(5, 3)
    (x @ weight).square().sum().backward()
    expected = weight.grad * mask.expand(3, 4)
    model = torch.nn.Module()
    model.w = weight
    gm = GradientMask({"w": weight}, {"w": mask})
    gm.apply(ParameterViews(model))
    assert torch.equal(weight.grad, expected)
    assert gm.updated_fraction() == mask.expand(3, 4).sum().item() / 12


# --- FGGM -------------------------------------------------------------------------------------
def test_fggm_trains_exactly_the_top_rows_by_aggregated_fisher():
    method = FGGM(alpha=0.7)
    module = _module(method)
    method.on_task_start(module, TASK, 1)
    rows = method.last_scores  # the Fisher summed over each row (element scores for 1-D tensors)
    everything = torch.cat([r.flatten() for r in rows.values()])
    thr = everything.sort().values[math.floor(0.7 * everything.numel()) - 1]
    kept = 0
    for n, r in rows.items():
        mask = method.mask.masks[n].bool().reshape(r.shape[0], -1)[:, 0] if r.dim() else method.mask.masks[n].bool()
        assert torch.equal(mask, r > thr), n
        kept += int(mask.sum())
    assert kept / everything.numel() == pytest.approx(0.3, abs=1 / everything.numel())
    assert method.last_unit_fraction == kept / everything.numel()
    method.on_task_end(module, TASK, 1)


def test_fggm_per_layer_scope_keeps_the_fraction_in_every_tensor_and_global_does_not():
    method = FGGM(alpha=0.7)
    module = _module(method)
    fisher = method.scores(module, TASK, dict(module.model.named_parameters()))
    rows = {n: aggregate(f, "row") for n, f in fisher.items() if f.dim() == 2}

    def kept_rows(masks):
        return {n: int(masks[n].expand(fisher[n].shape)[:, 0].sum()) for n in rows}

    per_layer = kept_rows(FGGM(alpha=0.7, quantile_scope="per_layer").build_masks(fisher))
    for n, r in rows.items():
        exact = r.numel() - math.floor(0.7 * r.numel())
        # rows of never-seen tokens tie at Fisher 0 and cannot be ranked: at most the exact count
        assert per_layer[n] == exact if r.unique().numel() == r.numel() else per_layer[n] <= exact, n
    glob = kept_rows(method.build_masks(fisher))
    fractions = [glob[n] / rows[n].numel() for n in rows]
    assert max(fractions) - min(fractions) > 0.2  # one global threshold favours some layers
    assert glob != per_layer


def test_fggm_bottom_updates_the_lowest_rows():
    scores = {"w": torch.arange(10.0).reshape(10, 1).expand(10, 4)}
    top = FGGM(alpha=0.7).build_masks(scores)["w"].flatten()
    bottom = FGGM(alpha=0.7, update="bottom").build_masks(scores)["w"].flatten()
    assert top.tolist() == [False] * 7 + [True] * 3
    assert bottom.tolist() == [True] * 3 + [False] * 7


class _Recording(FGGM):
    """FGGM that snapshots the weights around each task."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.records = []

    def on_task_start(self, module, task, task_index):
        super().on_task_start(module, task, task_index)
        self.records.append({"mask": None if self.mask is None else dict(self.mask.masks), "before": _snapshot(module.model)})

    def on_task_end(self, module, task, task_index):
        self.records[-1]["after"] = _snapshot(module.model)
        super().on_task_end(module, task, task_index)


def test_fggm_frozen_entries_stay_bitwise_equal_over_a_task_under_adamw(make_config, monkeypatch):
    method = _Recording(alpha=0.7, num_samples=8)
    monkeypatch.setattr("cl_bench.config.instantiate", instantiate_with(method))
    cfg = make_config("tasks.order=[arith,code]", "tasks.epochs=2", "optimizer.lr=1e-2")
    run(cfg, cfg.paths.output_dir)
    first, second = method.records
    assert first["mask"] is None  # skip_first_task: task 1 is unmasked
    assert all(not torch.equal(first["before"][n], first["after"][n]) for n in first["before"])
    moved = 0
    for n, mask in second["mask"].items():
        keep = mask.bool().expand(second["before"][n].shape)
        before, after = second["before"][n], second["after"][n]
        assert torch.equal(before[~keep], after[~keep]), n
        moved += int((before[keep] != after[keep]).sum())
    assert moved > 0


@pytest.mark.parametrize("name", ["fggm", "random_mask", "migu"])
def test_masking_refuses_weight_decay_before_the_model_loads(make_config, monkeypatch, name):
    """Refused at set-up: no model is built, nothing is evaluated (the base row would be)."""
    import cl_bench.stream_run
    built = []
    monkeypatch.setattr(cl_bench.stream_run, "evaluate_stream", lambda *a, **k: built.append("evaluated"))
    cfg = make_config(f"method={name}", "tasks.order=[arith,code]", "optimizer.weight_decay=0.01")
    with pytest.raises(ConfigError, match=f"method {name} freezes entries .* optimizer.weight_decay must be 0"):
        run(cfg, cfg.paths.output_dir)
    assert built == [] and not (Path(cfg.paths.output_dir) / "results.json").exists()


def test_hft_freezes_with_requires_grad_so_weight_decay_is_allowed(make_config):
    from methods.hft import HFT
    HFT().check_run(make_config("method=hft", "optimizer.weight_decay=0.01"))  # no error


def test_random_mask_trains_the_same_fraction_of_rows_reseeded_per_task():
    method = RandomMask(alpha=0.7, seed=1)
    module = _module(method)
    params = dict(module.model.named_parameters())
    masks = []
    for t in (1, 2):
        method.task_index = t
        m = method.build_masks(method.scores(module, TASK, params))
        rows = torch.cat([aggregate(v.expand(params[n].shape).float(), "row").gt(0).flatten() for n, v in m.items()])
        assert rows.float().mean().item() == pytest.approx(0.3, abs=0.01)
        masks.append(rows)
    assert not torch.equal(masks[0], masks[1])


# --- MIGU -------------------------------------------------------------------------------------
class _MiguProbe(MIGU):
    """MIGU plus an independent record of sum |W x| per Linear, and the gradients around the mask."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.checked = 0
        self.own_sums, self.own_handles, self.seen_tasks = {}, [], []

    def on_task_start(self, module, task, task_index):
        super().on_task_start(module, task, task_index)
        self.seen_tasks.append((task_index, self.active, len(self.handles)))
        for n, m in module.model.named_modules():
            if isinstance(m, torch.nn.Linear):
                self.own_handles.append(m.register_forward_hook(self._own(n)))

    def _own(self, name):
        def hook(mod, inp, out):
            if mod.training:
                self.own_sums[name] = self.own_sums.get(name, 0) + (inp[0] @ mod.weight.T).detach().abs().sum((0, 1))
        return hook

    def edit_gradients(self, pl_module, views):
        grads = {n: p.grad.clone() for n, p in pl_module.model.named_parameters() if p.grad is not None}
        super().edit_gradients(pl_module, views)
        if self.active:
            assert self.sums == {}  # accumulators reset every optimizer step
            names = dict(pl_module.model.named_parameters())
            for n, mask in self.last_masks.items():
                s = self.own_sums[n]
                assert torch.equal(mask, s >= torch.quantile(s, self.threshold))
                w = names[f"{n}.weight"]
                assert torch.equal(w.grad, grads[f"{n}.weight"] * mask[:, None])
            for n, p in names.items():
                if not any(n == f"{layer}.weight" for layer in self.last_masks):
                    assert p.grad is None or torch.equal(p.grad, grads[n]), n  # embeddings, norms, lm_head
            self.checked += 1
        self.own_sums = {}

    def on_task_end(self, module, task, task_index):
        super().on_task_end(module, task, task_index)
        for h in self.own_handles:
            h.remove()
        self.own_handles = []


def test_migu_masks_rows_by_the_steps_own_output_magnitudes(make_config, monkeypatch):
    method = _MiguProbe(threshold=0.7)
    monkeypatch.setattr("cl_bench.config.instantiate", instantiate_with(method))
    cfg = make_config("tasks.order=[arith,code]", "tasks.epochs=1", "train.micro_batch_size=2")
    run(cfg, cfg.paths.output_dir)
    assert method.seen_tasks[0] == (0, False, 0)  # first task: no hooks, no masking
    assert method.seen_tasks[1][1] is True
    assert method.checked == 3  # 12 examples: 3 global batches of 4, each 2 micro-batches of 2
    linear = {n for n, m in tiny_llama().model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(method.last_masks) == linear  # every Linear (the tiny model's lm_head is untied)


# --- EWC --------------------------------------------------------------------------------------
def _consolidate_random(method, module, seed=0):
    """Give ``method`` a random Fisher and an anchor near the current weights."""
    params = dict(module.model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    fisher = {n: torch.rand(p.shape, generator=g) for n, p in params.items()}
    anchor = {n: p.detach() + torch.randn(p.shape, generator=g) * 0.1 for n, p in params.items()}
    method.consolidated = [(fisher, anchor)]
    return params, fisher, anchor


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ewc_adds_lambda_f_times_distance_to_the_step_gradient(accumulate):
    method = EWC(lambda_=3.0)
    module = _module(method)
    method.on_stream_start(module, None)
    params, fisher, anchor = _consolidate_random(method, module)
    batches = list(module.pass_loader(TASK.train))[:accumulate]
    for batch in batches:  # the task gradient alone, as Lightning scales it under accumulation
        (causal_lm_loss(module.model, batch) / accumulate).backward()
    task_grad = {n: p.grad.clone() for n, p in params.items()}
    module.model.zero_grad(set_to_none=True)
    method.on_task_start(module, TASK, 1)
    method.on_train_start(SimpleNamespace(accumulate_grad_batches=accumulate), module)
    for batch in batches:
        (causal_lm_loss(module.model, batch) / accumulate).backward()
    method.edit_gradients(module, ParameterViews(module.model))  # once, after the micro-batches
    for n, p in params.items():
        torch.testing.assert_close(p.grad, task_grad[n] + 3.0 * fisher[n] * (p.detach() - anchor[n]))


def test_ewc_logs_the_penalty_value_and_adds_no_graph():
    method = EWC(lambda_=3.0)
    module = _module(method)
    logged = []
    module.metric_sink = lambda metrics, step: logged.append(metrics)
    method.on_stream_start(module, None)
    params, fisher, anchor = _consolidate_random(method, module)
    assert method.penalty(module, None, torch.tensor(2.0)) is None
    expected = 0.5 * 3.0 * sum((fisher[n] * (p.detach() - anchor[n]) ** 2).sum().item() for n, p in params.items())
    assert logged[-1]["ewc/penalty"] == pytest.approx(expected, rel=1e-5)
    assert logged[-1]["ewc/penalty_to_task_loss"] == pytest.approx(expected / 2.0, rel=1e-5)


@pytest.mark.parametrize("mode", ["online", "separate"])
def test_ewc_consolidation_online_decays_and_sums_separate_keeps_each_task(mode, monkeypatch):
    method = EWC(mode=mode, gamma=0.5)
    module = _module(method)
    fishers = iter([{n: torch.full_like(p, 2.0) for n, p in module.model.named_parameters()},
                    {n: torch.full_like(p, 3.0) for n, p in module.model.named_parameters()}])
    monkeypatch.setattr("methods.ewc.diagonal_fisher", lambda *a, **k: (next(fishers), {"seconds": 0.0}))
    method.on_task_end(module, TASK, 0)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(1.0)
    method.on_task_end(module, TASK, 1)
    name, p = next(iter(module.model.named_parameters()))
    if mode == "online":
        assert len(method.consolidated) == 1
        fisher, anchor = method.consolidated[0]
        assert torch.all(fisher[name] == 0.5 * 2.0 + 3.0) and torch.equal(anchor[name], p.detach())
    else:
        assert [f[name].unique().item() for f, _ in method.consolidated] == [2.0, 3.0]
        assert torch.equal(method.consolidated[0][1][name] + 1.0, method.consolidated[1][1][name])


def _grads(model, batch):
    model.zero_grad(set_to_none=True)
    causal_lm_loss(model, batch).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _trace_ewc_reference(model, tasks, lam, accumulate, lr):
    """TRACE's model/Regular/EWC.py loop, restated: autograd penalty with the live F, a hook that
    keeps each micro-batch's gradient (NaN -> 0), F += g^2 / len(dataloader) after every micro-batch."""
    params = dict(model.named_parameters())
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    previous = {n: p.detach().clone() for n, p in params.items()}
    grads = {}
    for n, p in params.items():
        p.register_hook(lambda g, n=n: grads.__setitem__(n, torch.nan_to_num(g, nan=0)))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for task_num, batches in enumerate(tasks):
        for i, batch in enumerate(batches):
            loss = causal_lm_loss(model, batch)
            if task_num != 0:
                loss = loss + 0.5 * lam * sum((fisher[n] * (p - previous[n]) ** 2).sum() for n, p in params.items())
            (loss / accumulate).backward()  # DeepSpeed's backward scales by the accumulation too
            for n in params:
                fisher[n] += grads[n] ** 2 / len(batches)
            if (i + 1) % accumulate == 0:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        previous = {n: p.detach().clone() for n, p in params.items()}
    return fisher


def test_ewc_trace_matches_a_restatement_of_traces_loop():
    lam, accumulate, lr = 400.0, 2, 0.05
    reference_model = tiny_llama(seed=0).model
    method = TraceEWC(lambda_=lam)
    module = _module(method)
    model = module.model
    batches = list(module.pass_loader(TASK.train))[:2] * 2  # 4 micro-batches, 2 optimizer steps per task
    tasks = [batches, batches]  # the penalty acts from task 2's second step on (moves weights by ~0.2 here)
    expected = _trace_ewc_reference(reference_model, tasks, lam, accumulate, lr)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    method.on_stream_start(module, None)
    for task_index, task_batches in enumerate(tasks):
        method.on_task_start(module, TASK, task_index)
        method.on_train_start(SimpleNamespace(accumulate_grad_batches=accumulate, num_training_batches=len(task_batches)),
                              module)
        for i, batch in enumerate(task_batches):
            (causal_lm_loss(model, batch) / accumulate).backward()
            if (i + 1) % accumulate == 0:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        method.on_task_end(module, TASK, task_index)
    for n, p in reference_model.named_parameters():
        torch.testing.assert_close(method.fisher[n], expected[n], rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(model.get_parameter(n), p, rtol=1e-4, atol=1e-7)
    assert any(f.abs().sum() > 0 for f in method.fisher.values())


# --- HFT --------------------------------------------------------------------------------------
def test_hft_freezes_half_of_each_block_reseeded_per_task():
    method = HFT(seed=0)
    plans = [method.choose(4, t) for t in (0, 1)]
    for plan in plans:
        assert all(sum(s.endswith("_proj") and s[0] in "qkvo" for s in mats) == 2 for mats in plan.values())
        mlp_counts = sorted(sum(s in ("gate_proj", "up_proj", "down_proj") for s in mats) for mats in plan.values())
        assert mlp_counts == [1, 1, 2, 2]
        assert all(sum(s.endswith("layernorm") for s in mats) == 1 for mats in plan.values())
    assert plans[0] != plans[1] and method.choose(4, 0) == plans[0]


class _HftRecording(HFT):
    def __init__(self):
        super().__init__(seed=0)
        self.records = []

    def on_task_start(self, module, task, task_index):
        super().on_task_start(module, task, task_index)
        frozen = [n for n, p in module.model.named_parameters() if not p.requires_grad]
        self.records.append({"frozen": frozen, "before": _snapshot(module.model)})

    def on_task_end(self, module, task, task_index):
        self.records[-1]["after"] = _snapshot(module.model)
        super().on_task_end(module, task, task_index)
        assert all(p.requires_grad for p in module.model.parameters())


def test_hft_frozen_matrices_stay_bitwise_equal_over_a_task(make_config, monkeypatch):
    method = _HftRecording()
    monkeypatch.setattr("cl_bench.config.instantiate", instantiate_with(method))
    cfg = make_config("tasks.order=[arith,code]", "optimizer.lr=1e-2")
    run(cfg, cfg.paths.output_dir)
    for rec in method.records:
        assert len(rec["frozen"]) == 2 * 2 + 1 + 2 + 2  # 2 blocks: 2 attention each, MLP 1 + 2, a norm each
        for n in rec["frozen"]:
            assert torch.equal(rec["before"][n], rec["after"][n]), n
        assert not torch.equal(rec["before"]["model.embed_tokens.weight"], rec["after"]["model.embed_tokens.weight"])
    assert method.records[0]["frozen"] != method.records[1]["frozen"]


# --- every method through the runner; the plugin seam; bad input --------------------------------
METHODS = ["sft", "ewc", "ewc_trace", "mas", "migu", "fggm", "hft", "random_mask", "replay", "lwf", "agem", "gere", "agft"]


@pytest.mark.parametrize("name", METHODS)
def test_every_method_runs_the_stream(make_config, name):
    small = {"ewc": ["method.num_samples=4"], "fggm": ["method.num_samples=4"],
             "gere": ["method.num_samples=4", "method.generate_tokens=16"]}.get(name, [])
    cfg = make_config(f"method={name}", "tasks.order=[arith,code,simplify]", *small)
    recorder = run(cfg, cfg.paths.output_dir)
    assert recorder.status == "finished" and len(recorder.R) == 4


def test_a_new_method_is_one_file_and_one_yaml(make_config):
    cfg = make_config(f"hydra.searchpath=[file://{ROOT / 'tests' / 'plugin_example'}]", "method=l2_init", "tasks.order=[arith,code]")
    assert cfg.method._target_ == "tests.plugin_example.l2_init.L2Init"
    recorder = run(cfg, cfg.paths.output_dir)
    assert recorder.status == "finished"


@pytest.mark.processes
def test_the_readme_s_adding_a_method_snippet_runs_as_written(tmp_path):
    """The README's two blocks written where their first lines say, into a copy of the repo's
    methods/, conf/ and runners/, run through the real runner; without its import line the plugin
    fails in one line that names the file, the line and the NameError."""
    import re
    import shutil
    import subprocess
    import sys
    section = (ROOT / "README.md").read_text().split("### Adding a method", 1)[1]
    blocks = re.findall(r"```(?:python|yaml)\n# (\S+)\n(.*?)```", section, re.S)[:2]
    assert [path for path, _ in blocks] == ["methods/l2_init.py", "conf/method/l2_init.yaml"]
    repo = tmp_path / "repo"
    for folder in ("methods", "conf", "runners"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for path, text in blocks:
        (repo / path).write_text(text)
    args = [sys.executable, "-m", "runners.cl", "method=l2_init", *TINY, "tasks.order=[arith]"]
    done = subprocess.run([*args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=repo, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "finished"
    plugin = repo / "methods" / "l2_init.py"
    plugin.write_text(plugin.read_text().replace("from methods.base import CLMethod\n", ""))
    failed = subprocess.run([*args, f"hydra.run.dir={tmp_path / 'broken'}"], cwd=repo, capture_output=True,
                            text=True, timeout=300)
    line = next(ln for ln in failed.stderr.splitlines() if ln.startswith("Error: "))
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert re.fullmatch(r"Error: cannot import methods\.l2_init\.L2Init: \S+/methods/l2_init\.py:\d+: "
                        r"NameError: name 'CLMethod' is not defined", line), line


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=fggm", "method.alpha=1.0"], r"method.alpha must be in \(0, 1\)"),
        (["method=fggm", "method.alpha=0"], r"method.alpha must be in \(0, 1\)"),
        (["method=migu", "method.threshold=1.5"], r"method.threshold must be in \(0, 1\)"),
        (["method=ewc", "method.lambda_=-1"], "method.lambda_ must be >= 0"),
        (["method=ewc", "method.num_samples=0"], "method.num_samples must be an integer >= 1"),
        (["method=fggm", "method.aggregate=block"], "method.aggregate must be one of"),
        (["method=fggm", "method.quantile_scope=local"], "quantile_scope must be one of"),
        (["method=ewc", "method.mode=both"], "method.mode must be one of"),
        (["method=fggm", "method.param_patterns=[nothing.*]"], r"method.param_patterns \['nothing.\*'\] match no"),
        (["method=migu", "method.module_patterns=[nothing]"], "method.module_patterns .* match no nn.Linear"),
        (["method=hft", "method.block_pattern=blocks"], "match no transformer block"),
        (["method=fggm", "trainer.strategy=fsdp"], r"trainer.strategy is fsdp1, .* use trainer=fsdp \(FSDP2"),
        (["method=fggm", "trainer.strategy=deepspeed_stage_2"], "trainer.strategy is deepspeed, which is not one"),
        (["method=ewc", "trainer=deepspeed"], "method ewc supports .*trainer.strategy is deepspeed"),
        (["method=ewc_trace", "trainer=fsdp"], "method ewc_trace supports .*trainer.strategy is fsdp"),
        (["method=lwf", "trainer=fsdp"], "under trainer=fsdp use method.teacher=topk"),
    ],
)
def test_bad_method_settings_fail_before_training(make_config, overrides, message):
    cfg = make_config(*overrides)
    with pytest.raises(ConfigError, match=message):
        run(cfg, cfg.paths.output_dir)
    assert not (Path(cfg.paths.output_dir) / "results.json").exists()


def test_sft_is_allowed_under_every_strategy():
    from methods.sft import SFT
    for strategy in ("auto", "ddp", "deepspeed_stage_2", {"_target_": "lightning.pytorch.strategies.DDPStrategy"},
                     {"_target_": "lightning.pytorch.strategies.ModelParallelStrategy"}):
        SFT().check_strategy(strategy, 2)


# --- FGGM's options ----------------------------------------------------------------------------
def test_fisher_samples_are_seeded_uniform_and_whole_by_default():
    from methods.shared.importance import sample_examples
    items = list(range(100))
    first, again, other = sample_examples(items, 10, 1), sample_examples(items, 10, 1), sample_examples(items, 10, 2)
    assert first == again and first != other and first == sorted(first) and len(set(first)) == 10
    assert first != items[:10]  # not the first examples in file order
    assert sample_examples(items, None, 1) == items and sample_examples(items, 500, 1) == items


def test_fggm_fisher_is_taken_over_its_sample(monkeypatch):
    seen = []

    def fisher(model, batches, params, *args):
        seen.extend(int(b["input_ids"].shape[0]) for b in batches)
        return {n: torch.ones_like(p) for n, p in params.items()}, {"seconds": 0.0, "samples": sum(seen)}
    monkeypatch.setattr("methods.fggm.diagonal_fisher", fisher)
    method = FGGM(num_samples=3, seed=5)
    method.on_task_start(_module(method), TASK, 1)
    assert sum(seen) == 3  # of the task's 8 examples
    seen.clear()
    whole = FGGM()  # num_samples=None: the whole training split, as the paper averages
    whole.on_task_start(_module(whole), TASK, 1)
    assert sum(seen) == len(TASK.train)


def test_row_scores_sum_or_average_the_entries():
    score = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    assert torch.equal(aggregate(score, "row"), torch.tensor([4.0, 4.0]))
    assert torch.equal(aggregate(score, "row", "mean"), torch.tensor([2.0, 2.0]))
    assert torch.equal(aggregate(score, "column", "mean"), torch.tensor([1.5, 2.5]))


@pytest.mark.parametrize("vectors, expected", [("train", True), ("freeze", False)])
def test_one_dimensional_tensors_can_be_always_trained_or_frozen(vectors, expected):
    method = FGGM(alpha=0.5, vectors=vectors)
    scores = {"w": torch.tensor([[4.0, 4.0], [1.0, 1.0], [3.0, 3.0], [2.0, 2.0]]), "norm": torch.tensor([9.0, 0.0])}
    masks = method.build_masks(scores)
    assert masks["norm"].tolist() == [expected, expected]
    assert masks["w"].flatten().tolist() == [True, False, True, False]  # half of the rows, by their own ranking
    ranked = FGGM(alpha=0.5).build_masks(scores)  # "mask": the norm's entries compete with the rows
    assert ranked["norm"].tolist() == [True, False]


@pytest.mark.parametrize("mask_tied_head", [True, False])
def test_migu_masks_a_tied_lm_head_as_the_official_code_does(mask_tied_head):
    method = MIGU(mask_tied_head=mask_tied_head)
    model = tiny_llama().model
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in Qwen2 or SmolLM2
    assert ("lm_head" in method._linear_layers(model)) is mask_tied_head
    assert "lm_head" in MIGU(mask_tied_head=False)._linear_layers(tiny_llama().model)  # an untied head always is


def test_hft_freezes_a_matrix_with_its_bias():
    model = tiny_llama().model
    for block in model.model.layers:  # give q, k, v biases, as Qwen2 has
        for proj in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
            proj.bias = torch.nn.Parameter(torch.zeros(proj.out_features))
    method = HFT(seed=3)
    method.on_task_start(SimpleNamespace(model=model, log_metrics=lambda m: None), TASK, 0)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    for n, p in model.named_parameters():
        if n.endswith(".bias"):
            assert (n in frozen) == (n.replace(".bias", ".weight") in frozen), n
    assert any(n.endswith("_proj.bias") for n in frozen)


# --- MAS --------------------------------------------------------------------------------------
def test_mas_importance_equals_brute_force_per_example_output_gradients():
    from cl_bench.data.tokenization import IGNORE_INDEX, encode_train
    from methods.shared.importance import output_sensitivity
    bundle = tiny_llama(seed=1)
    model = bundle.model
    module = _module(MAS())
    params = dict(model.named_parameters())
    got, stats = output_sensitivity(model, module.loaders.passes(TASK.train), params, num_samples=None)
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for ex in TASK.train:  # one example at a time, no padding, the full logits
        item = encode_train(bundle.tokenizer, ex, 64, 8)
        ids, labels = torch.tensor([item["input_ids"]]), torch.tensor([item["labels"]])
        logits = model(input_ids=ids).logits[0, :-1]
        predicts_answer = labels[0, 1:] != IGNORE_INDEX
        model.zero_grad()
        logits[predicts_answer].square().sum().backward()
        for n, p in params.items():
            expected[n] += p.grad.abs() / len(TASK.train)
    assert stats["samples"] == len(TASK.train)
    for n in params:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6)


def test_mas_penalty_is_lambda_omega_times_squared_distance():
    method = MAS(lambda_=3.0)
    module = _module(method)
    method.on_stream_start(module, None)
    params, omega, anchor = _consolidate_random(method, module)
    batch = list(module.pass_loader(TASK.train))[0]
    causal_lm_loss(module.model, batch).backward()
    task_grad = {n: p.grad.clone() for n, p in params.items()}
    module.model.zero_grad(set_to_none=True)
    method.on_task_start(module, TASK, 1)
    method.on_train_start(SimpleNamespace(accumulate_grad_batches=1), module)
    causal_lm_loss(module.model, batch).backward()
    views = ParameterViews(module.model)
    method.edit_gradients(module, views)
    for n, p in params.items():
        torch.testing.assert_close(p.grad, task_grad[n] + 2 * 3.0 * omega[n] * (p.detach() - anchor[n]))
    expected = 3.0 * sum((omega[n] * (p.detach() - anchor[n]) ** 2).sum().item() for n, p in params.items())
    assert method.penalty_value(views) == pytest.approx(expected, rel=1e-5)


# --- replay -----------------------------------------------------------------------------------
def test_replay_keeps_the_seeded_sample_and_trains_later_tasks_with_it(tmp_path):
    import json
    from cl_bench.rng import derive_seed
    from methods.shared.importance import sample_examples
    from methods.replay import Replay
    general = tmp_path / "lima.json"
    general.write_text(json.dumps([{"prompt": "Say hi. Answer:", "answer": "hi"}]))
    method = Replay(ratio=0.25, general_data=str(general), seed=7)
    module = _module(method)
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


@pytest.mark.parametrize("kwargs, message", [
    ({"per_task": None, "ratio": None}, "method.per_task or method.ratio must be set"),
    ({"per_task": None, "ratio": 1.5}, r"method.ratio must be in \(0, 1\]"),
    ({"per_task": 0, "ratio": None}, "method.per_task must be an integer >= 1"),
])
def test_bad_replay_settings_are_refused(kwargs, message):
    from methods.replay import Replay
    with pytest.raises(ConfigError, match=message):
        Replay(**kwargs)
