"""Masking methods: the gradient mask, FGGM and its options, random rows, MIGU and HFT,
each against a direct computation or a bitwise invariant on the tiny model."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cl_bench.errors import ConfigError
from cl_bench.models import tiny_llama
from cl_bench.stream_run import run
from cl_bench.training.parameter_views import ParameterViews
from methods.fggm import FGGM
from methods.hft import HFT
from methods.migu import MIGU
from methods.random_mask import RandomMask
from methods.shared.masking import GradientMask, aggregate
from tests.conftest import instantiate_with, tiny_module, tiny_task

TASK = tiny_task()


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class _Recording(FGGM):
    """FGGM that snapshots the weights around each task."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.records = []

    def on_task_start(self, module, task, task_index):
        super().on_task_start(module, task, task_index)
        self.records.append(
            {"mask": None if self.mask is None else dict(self.mask.masks), "before": _snapshot(module.model)}
        )

    def on_task_end(self, module, task, task_index):
        self.records[-1]["after"] = _snapshot(module.model)
        super().on_task_end(module, task, task_index)


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


@pytest.mark.parametrize(
    "mask",
    [
        torch.tensor([[True], [False], [True]]),  # rows
        torch.tensor([[False, True, True, False]]),  # columns
        torch.tensor([[True, False, True, False]] * 3),  # elements
    ],
    ids=["row", "column", "element"],
)
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


def test_fggm_trains_exactly_the_top_rows_by_aggregated_fisher():
    method = FGGM(alpha=0.7)
    module = tiny_module(method)
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
    module = tiny_module(method)
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
    module = tiny_module(method)
    params = dict(module.model.named_parameters())
    masks = []
    for t in (1, 2):
        method.task_index = t
        m = method.build_masks(method.scores(module, TASK, params))
        rows = torch.cat([aggregate(v.expand(params[n].shape).float(), "row").gt(0).flatten() for n, v in m.items()])
        assert rows.float().mean().item() == pytest.approx(0.3, abs=0.01)
        masks.append(rows)
    assert not torch.equal(masks[0], masks[1])


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


def test_hft_freezes_half_of_each_block_reseeded_per_task():
    method = HFT(seed=0)
    plans = [method.choose(4, t) for t in (0, 1)]
    for plan in plans:
        assert all(sum(s.endswith("_proj") and s[0] in "qkvo" for s in mats) == 2 for mats in plan.values())
        mlp_counts = sorted(sum(s in ("gate_proj", "up_proj", "down_proj") for s in mats) for mats in plan.values())
        assert mlp_counts == [1, 1, 2, 2]
        assert all(sum(s.endswith("layernorm") for s in mats) == 1 for mats in plan.values())
    assert plans[0] != plans[1] and method.choose(4, 0) == plans[0]


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
    method.on_task_start(tiny_module(method), TASK, 1)
    assert sum(seen) == 3  # of the task's 8 examples
    seen.clear()
    whole = FGGM()  # num_samples=None: the whole training split, as the paper averages
    whole.on_task_start(tiny_module(whole), TASK, 1)
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
    for n, _ in model.named_parameters():
        if n.endswith(".bias"):
            assert (n in frozen) == (n.replace(".bias", ".weight") in frozen), n
    assert any(n.endswith("_proj.bias") for n in frozen)
