"""The merging methods: each merge equals a restatement of its reference code on the same task
vectors, the protocol (which weights each task starts from, what is evaluated) holds through the
real runner, and bad settings are refused by name.

The restatements follow the reference files line by line (docs/fidelity.md names them):
fusion_bench/method/opcm/task_arithmetic.py, opcm/ties_merging.py with
ties_merging/ties_merging_utils.py, opcm/opcm.py, fisher_merging/fisher_merging.py
(``merging_with_fisher_weights``), and danielm1405/magmax's ``merge_max_abs`` with
``evaluate_merged_fts``; peft's ``ties`` is called as it is.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft.utils.merge_utils import ties as peft_ties

from cl_bench.errors import ConfigError
from methods.fisher_merge import FisherMerge
from methods.magmax import MagMax
from methods.opcm import OPCM
from methods.task_arithmetic import TaskArithmetic
from methods.ties import TIES, ties_merge
from tests.conftest import TINY, compose_config, instantiate_with, tiny_module, tiny_task

# --- the references, restated ---------------------------------------------------------------------


def ref_task_arithmetic(theta0, thetas, scaling):
    """fusion_bench opcm/task_arithmetic.py: M = theta_0; per model, M += scaling * (theta - theta_0)."""
    merged, out = dict(theta0), []
    for theta in thetas:
        merged = {n: merged[n] + scaling * (theta[n] - theta0[n]) for n in merged}
        out.append(merged)
    return out


def ref_magmax(theta0, thetas, scaling):
    """magmax's evaluate_merged_fts: merge_max_abs(task_vectors[:idx + 1]), apply_to(pretrained, coef)."""
    vectors = [{n: theta[n] - theta0[n] for n in theta0} for theta in thetas]
    out = []
    for idx in range(len(vectors)):
        seen = vectors[: idx + 1]
        merged = {}
        for key in seen[0]:
            max_abs = seen[0][key]
            for vector in seen[1:]:
                max_abs = torch.where(vector[key].abs() >= max_abs.abs(), vector[key], max_abs)
            merged[key] = max_abs
        out.append({n: theta0[n] + scaling * merged[n] for n in theta0})
    return out


def _flat(state):
    return torch.cat([state[k].reshape(-1) for k in sorted(state)])


def _unflat(vector, like):
    out, i = {}, 0
    for k in sorted(like):
        out[k] = vector[i : i + like[k].numel()].view_as(like[k])
        i += like[k].numel()
    return out


def ref_ties_merging(flat_task_checks, reset_thresh, merge_func):
    """ties_merging_utils.ties_merging: topk_values_mask, resolve_sign, disjoint_merge."""
    m = flat_task_checks.clone()
    k = reset_thresh / 100 if reset_thresh > 1 else reset_thresh
    d = m.shape[1]
    kth = m.abs().kthvalue(d - int(d * k), dim=1, keepdim=True).values
    m = m * (m.abs() >= kth)
    sign = torch.sign(m.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    selected = m * torch.where(sign.unsqueeze(0) > 0, m > 0, m < 0)
    if merge_func == "mean":
        return selected.sum(dim=0) / torch.clamp((selected != 0).sum(dim=0).float(), min=1)
    return selected.sum(dim=0)


def ref_ties(theta0, thetas, scaling, threshold, merge_func):
    """fusion_bench opcm/ties_merging.py: the first task vector as it is, then TIES of the merged
    vector and the new one; M += scaling * that."""
    merged, out = dict(theta0), []
    for idx, theta in enumerate(thetas):
        vector = {n: theta[n] - theta0[n] for n in theta0}
        if idx == 0:
            step = vector
        else:
            rows = torch.vstack([_flat({n: merged[n] - theta0[n] for n in theta0}), _flat(vector)])
            step = _unflat(ref_ties_merging(rows, threshold, merge_func), theta0)
        merged = {n: merged[n] + scaling * step[n] for n in theta0}
        out.append(merged)
    return out


def ref_opcm(model, theta0, thetas, alpha):
    """fusion_bench opcm/opcm.py (OPCMForCLIP.run, merge_linear_weights, merge_other_parameters)."""
    norm = lambda a, b: torch.linalg.norm(_flat({n: a[n] - b[n] for n in a}))  # noqa: E731 (get_task_vector_norm)
    merged = dict(thetas[0])
    norms, previous_lambda = [norm(merged, theta0)], 1
    out = [merged]
    for theta in thetas[1:]:
        norms.append(norm(theta, theta0))
        average = sum(norms) / len(norms)
        lambda_t, new = 1, dict(merged)
        for module_name, module in model.named_modules():
            if list(module.children()):
                continue
            for param_name, _ in module.named_parameters(recurse=False):
                n = f"{module_name}.{param_name}"
                previous, task = merged[n] - theta0[n], theta[n] - theta0[n]
                if isinstance(module, torch.nn.Linear) and param_name == "weight":
                    u, s, vh = torch.linalg.svd(previous, full_matrices=True)
                    v = vh.T
                    split = (s.cumsum(dim=0) / s.sum() > alpha).float().argmax().item()
                    p = u.T @ task @ v
                    p.diagonal().fill_(0)
                    p[:split, :split] = 0
                    task = u @ p @ v.T
                new[n] = theta0[n] + (previous_lambda * previous + task) / lambda_t
        n_t = norm(new, theta0)
        previous_lambda = lambda_t * n_t / average
        merged = {n: theta0[n] + (new[n] - theta0[n]) * (average / n_t) for n in new}
        out.append(merged)
    return out


def ref_fisher(thetas, fishers, eps, normalize):
    """fusion_bench fisher_merging.merging_with_fisher_weights over the models seen so far."""
    out = []
    for t in range(1, len(thetas) + 1):
        names = list(thetas[0])
        coefficients = torch.ones(t) / t
        if normalize:
            fisher_norm = torch.norm(
                torch.stack([torch.stack([torch.linalg.vector_norm(f[n]) for n in names]) for f in fishers[:t]]), dim=1
            )
            inverse = 1.0 / (fisher_norm + eps)
            coefficients = coefficients * inverse / inverse.sum()
        merged = {}
        for n in names:
            values = torch.stack([theta[n] for theta in thetas[:t]])
            weights = torch.stack([f[n] for f in fishers[:t]]) + eps
            c = coefficients.reshape(-1, *[1] * (values.dim() - 1))
            merged[n] = (c * weights * values).sum(dim=0) / (c * weights).sum(dim=0)
        out.append(merged)
    return out


# --- the methods, driven over three fine-tunings ------------------------------------------------


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def drive(method, tasks: int = 3, seed: int = 0):
    """The seam as the runner calls it: each task's fine-tuning stands in for a random step of size
    1e-2 from where the task starts; returns (theta_0, the starts, the fine-tuned, the merged)."""
    module = tiny_module(method)
    method.on_stream_start(module, None)
    theta0 = _weights(module.model)
    g = torch.Generator().manual_seed(seed)
    starts, tuned, merged = [], [], []
    for t in range(tasks):
        module.start_task_weights(tiny_task(), t)
        starts.append(_weights(module.model))
        with torch.no_grad():
            for p in module.model.parameters():
                p.add_(1e-2 * torch.randn(p.shape, generator=g))
        tuned.append(_weights(module.model))
        module.merge_after_task(tiny_task(), t)
        merged.append(_weights(module.model))
    return module, theta0, starts, tuned, merged


def assert_states(got, expected, **tolerance):
    assert got.keys() == expected.keys()
    for n in got:
        torch.testing.assert_close(got[n], expected[n], msg=lambda m, n=n: f"{n}: {m}", **tolerance)


EXACT = {"rtol": 0, "atol": 0}


def test_task_arithmetic_is_fusion_bench_s_continual_task_arithmetic():
    _, theta0, starts, tuned, merged = drive(TaskArithmetic(scaling=0.3))
    assert all(torch.equal(s[n], theta0[n]) for s in starts for n in theta0)  # each from theta_0
    for got, expected in zip(merged, ref_task_arithmetic(theta0, tuned, 0.3)):
        assert_states(got, expected, **EXACT)


def test_magmax_fine_tunes_sequentially_and_merges_the_largest_magnitudes_seen_so_far():
    module, theta0, starts, tuned, merged = drive(MagMax(scaling=0.5))
    assert all(torch.equal(starts[t][n], tuned[t - 1][n]) for t in (1, 2) for n in theta0)  # from theta_{t-1}
    for got, expected in zip(merged, ref_magmax(theta0, tuned, 0.5)):
        assert_states(got, expected, **EXACT)
    assert [m["task"] for m in module.method.report()["merges"]] == ["t"] * 3


@pytest.mark.parametrize("merge", ["sum", "mean"])
def test_ties_is_fusion_bench_s_continual_ties_merging(merge):
    _, theta0, starts, tuned, merged = drive(TIES(scaling=0.5, density=0.2, merge=merge))
    assert all(torch.equal(s[n], theta0[n]) for s in starts for n in theta0)
    for got, expected in zip(merged, ref_ties(theta0, tuned, 0.5, 20, merge)):
        assert_states(got, expected, **EXACT)


def test_ties_per_tensor_is_peft_s_ties_on_full_weights():
    """trim: tensor, merge: mean is peft's ``ties`` (magnitude pruning per tensor, the sign of the
    sum, the disjoint mean) wherever no elected sum is exactly zero (peft gives a zero +1, the
    reference the whole model's majority)."""
    g = torch.Generator().manual_seed(1)
    rows = [{"a": torch.randn(6, 5, generator=g), "b": torch.randn(7, generator=g)} for _ in range(3)]
    got = ties_merge(rows, 0.4, trim="tensor", merge="mean")
    for n in ("a", "b"):
        expected = peft_ties(torch.stack([r[n] for r in rows]), torch.ones(3), 0.4, "total")
        assert torch.equal(got[n], expected)


def test_ties_keeps_the_top_share_over_the_whole_model_not_per_tensor():
    """Brute force on two tensors: density 0.5 of 8 entries keeps every magnitude at or above the
    (8 - 4)-th smallest (0.4), as the reference's ``topk_values_mask`` does: the 4 largest, all in
    one tensor, and the k-th itself (one more than int(d * density) when no magnitudes tie)."""
    row = {"a": torch.tensor([8.0, -7.0, 6.0, 5.0]), "b": torch.tensor([0.1, -0.2, 0.3, 0.4])}
    got = ties_merge([row], 0.5, trim="model")
    assert torch.equal(got["a"], row["a"]) and torch.equal(got["b"], torch.tensor([0.0, 0.0, 0.0, 0.4]))
    per_tensor = ties_merge([row], 0.5, trim="tensor")  # peft: the top 2 of each tensor
    assert torch.equal(per_tensor["b"], torch.tensor([0.0, 0.0, 0.3, 0.4]))


def test_opcm_is_fusion_bench_s_opcm():
    module, theta0, starts, tuned, merged = drive(OPCM(alpha=0.5), tasks=4)
    assert all(torch.equal(s[n], theta0[n]) for s in starts for n in theta0)
    model = copy.deepcopy(module.model)
    for got, expected in zip(merged, ref_opcm(model, theta0, tuned, 0.5)):  # norms in float64 here, 32 there
        assert_states(got, expected, rtol=1e-5, atol=1e-6)
    assert module.method.lambda_t > 1  # the merged vector's norm grows past the mean task vector's


def test_fisher_merge_is_fusion_bench_s_fisher_weighted_average(monkeypatch):
    """The Fisher of each task (EWC's estimate, tested in tests/test_fisher.py) drawn at random here
    so that the merge rule itself is compared, with and without the norm weighting."""
    for normalize in (True, False):
        fishers: list[dict[str, torch.Tensor]] = []
        draws = torch.Generator().manual_seed(2)

        def fake_fisher(model, batches, params, mode, num_samples, fishers=fishers, g=draws):
            fishers.append({n: torch.rand(p.shape, generator=g) * 10 ** (len(fishers) - 1) for n, p in params.items()})
            return fishers[-1], {"seconds": 0.0, "samples": 4}

        monkeypatch.setattr("methods.fisher_merge.diagonal_fisher", fake_fisher)
        _, theta0, starts, tuned, merged = drive(FisherMerge(normalize_fisher_weight=normalize))
        assert all(torch.equal(s[n], theta0[n]) for s in starts for n in theta0)
        for got, expected in zip(merged, ref_fisher(tuned, fishers, 1e-6, normalize)):
            assert_states(got, expected, rtol=1e-5, atol=1e-7)


def test_fisher_merge_weights_each_task_by_ewc_s_fisher_on_a_seeded_sample(monkeypatch):
    """The Fisher is EWC's (``diagonal_fisher``) at the task's fine-tuned weights, over
    ``num_samples`` examples drawn with the method's seed; the sums take w (F + eps) with
    w = 1 / (||F|| + eps)."""
    from cl_bench.rng import derive_seed
    from methods.shared.importance import diagonal_fisher, sample_examples

    seen = []

    def spy(model, batches, params, mode, num_samples):
        batches = list(batches)
        fisher, stats = diagonal_fisher(model, batches, params, mode, num_samples)
        seen.append((sum(len(b["input_ids"]) for b in batches), mode, _weights(model), fisher))
        return fisher, stats

    monkeypatch.setattr("methods.fisher_merge.diagonal_fisher", spy)
    method = FisherMerge(num_samples=4, seed=3)
    module, theta0, _, tuned, _ = drive(method, tasks=1)
    ((examples, mode, at, fisher),) = seen
    assert examples == 4 and mode == "batch" and all(torch.equal(at[n], tuned[0][n]) for n in theta0)
    expected = diagonal_fisher(
        _model_at(module, tuned[0]),
        module.pass_loader(sample_examples(tiny_task().train, 4, derive_seed(3, 0))),
        dict(module.model.named_parameters()),
        "batch",
        None,
    )[0]
    assert all(torch.equal(fisher[n], expected[n]) for n in theta0)
    w = 1 / (torch.sqrt(sum(f.double().square().sum() for f in fisher.values())).item() + 1e-6)
    assert sum(f.sum() for f in fisher.values()) > 0
    assert_states(method.weight_sum, {n: w * (f + 1e-6) for n, f in fisher.items()}, rtol=1e-6, atol=0)


def _model_at(module, weights):
    """``module.model`` with ``weights`` written into it (the merge moved it since)."""
    with torch.no_grad():
        for n, p in module.model.named_parameters():
            p.copy_(weights[n])
    return module.model


def test_a_merge_changes_the_weights_version_the_engine_syncs_on():
    """vLLM skips a sync whose version it has: a merge after a task's last step must not look like
    the weights of that step (the continual evaluation's last point)."""
    module = tiny_module(TaskArithmetic())
    module.method.on_stream_start(module, None)
    before = module.weights_version
    module.merge_after_task(tiny_task(), 0)
    after = module.weights_version
    module.start_task_weights(tiny_task(), 1)
    assert len({before, after, module.weights_version}) == 3


MERGERS = {"task_arithmetic": TaskArithmetic, "ties": TIES, "magmax": MagMax, "opcm": OPCM, "fisher_merge": FisherMerge}


@pytest.mark.parametrize("name", list(MERGERS))
def test_a_merge_resumed_from_its_checkpointed_state_continues_bitwise(name, tmp_path, monkeypatch):
    """Three tasks straight, against two, the state through torch.save and a fresh method and
    model (the stage's merged weights restored), then the third: the same weights at every point."""
    if name == "fisher_merge":  # a Fisher that depends on the weights alone, so both paths see the same
        monkeypatch.setattr(
            "methods.fisher_merge.diagonal_fisher",
            lambda model, batches, params, mode, num: (
                {n: p.detach().abs() + 1 for n, p in params.items()},
                {"seconds": 0},
            ),
        )
    _, theta0, _, tuned, merged = drive(MERGERS[name](), tasks=3)
    first = MERGERS[name]()
    module = tiny_module(first)
    first.on_stream_start(module, None)
    for t in range(2):
        module.start_task_weights(tiny_task(), t)
        _model_at(module, tuned[t])
        module.merge_after_task(tiny_task(), t)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    again = MERGERS[name]()
    resumed = tiny_module(again, seed=1)  # other initial weights: everything must come from the state
    again.on_stream_start(resumed, None)
    again.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    _model_at(resumed, merged[1])
    resumed.start_task_weights(tiny_task(), 2)
    start = _weights(resumed.model)
    expected_start = tuned[1] if name == "magmax" else theta0
    assert all(torch.equal(start[n], expected_start[n]) for n in start)
    _model_at(resumed, tuned[2])
    resumed.merge_after_task(tiny_task(), 2)
    assert_states(_weights(resumed.model), merged[2], **EXACT)


# --- settings refused by name ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: TIES(density=0), r"method.density"),
        (lambda: TIES(trim="row"), r"method.trim"),
        (lambda: TIES(merge="max"), r"method.merge"),
        (lambda: TaskArithmetic(scaling=-1), r"method.scaling"),
        (lambda: OPCM(alpha=1.5), r"method.alpha"),
        (lambda: FisherMerge(minimal_fisher_weight=-1), r"method.minimal_fisher_weight"),
    ],
)
def test_bad_settings_are_refused_by_key(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["model.lora.enabled=true"], r"method magmax does not train LoRA adapters .*merge full weights"),
        (["optimizer.reset_per_task=false"], r"method magmax fine-tunes each task as its own run.*reset_per_task"),
        (["tasks.joint=true"], r"method magmax merges what each task of the stream taught; tasks.joint=true"),
    ],
)
def test_a_run_a_merge_cannot_serve_is_refused_at_start(overrides, match, tmp_path, cache_dir):
    from cl_bench.stream_run import StreamRun

    cfg = compose_config([*TINY, "method=magmax", *overrides], tmp_path, cache_dir)
    with pytest.raises(ConfigError, match=match):
        StreamRun(cfg, tmp_path)


# --- the protocol through the runner ----------------------------------------------------------


class Recording:
    """Keeps the weights each task starts from and the ones it was fine-tuned to."""

    def on_task_start(self, module, task, task_index):
        self.starts.append(_weights(module.model))
        super().on_task_start(module, task, task_index)

    def merge(self, module, task, task_index):
        self.tuned.append(_weights(module.model))
        super().merge(module, task, task_index)


@pytest.mark.parametrize("name", ["task_arithmetic", "magmax"])
def test_the_runner_trains_each_task_from_where_the_method_says_and_evaluates_the_merge(
    name, tmp_path, cache_dir, monkeypatch
):
    cls = {"task_arithmetic": TaskArithmetic, "magmax": MagMax}[name]
    method = type(f"Recording{cls.__name__}", (Recording, cls), {})()
    method.starts, method.tuned = [], []
    monkeypatch.setattr("cl_bench.config.instantiate", instantiate_with(method))
    from cl_bench.stream_run import run

    overrides = [*TINY, f"method={name}", "tasks.order=[arith,code]", "checkpoint.keep_stages=null"]
    run(compose_config(overrides, tmp_path, cache_dir), tmp_path)
    theta0 = method.starts[0]
    stages = [torch.load(tmp_path / "checkpoints" / f"stage-00{i}.pt", weights_only=True)["model"] for i in (1, 2)]
    expected_start = theta0 if name == "task_arithmetic" else method.tuned[0]
    assert all(torch.equal(method.starts[1][n], expected_start[n]) for n in theta0)
    assert not any(torch.equal(method.starts[1][n], stages[0][n]) for n in theta0 if n.endswith("proj.weight"))
    reference = ref_task_arithmetic if name == "task_arithmetic" else ref_magmax
    for stage, expected in zip(stages, reference(theta0, method.tuned, method.scaling)):
        assert_states({n: stage[n] for n in theta0}, expected, **EXACT)  # what was evaluated and kept


def test_magmax_gives_a_tie_in_magnitude_to_the_later_task():
    method = MagMax(scaling=1.0)
    method.pretrained = {"w": torch.zeros(3)}
    first, second = {"w": torch.tensor([0.5, -0.5, 0.2])}, {"w": torch.tensor([-0.5, 0.5, 0.1])}
    method.fold(None, None, None, first, first, None, 0)
    merged = method.fold(None, None, None, second, second, None, 1)
    assert torch.equal(merged["w"], torch.tensor([-0.5, 0.5, 0.2]))


def test_the_plan_counts_the_host_copies_each_process_keeps():
    from cl_bench.models import tiny_llama

    model = tiny_llama(seed=0).model
    fp32 = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    magmax, opcm = MagMax(), OPCM()
    magmax.row_shards = True  # trainer=fsdp: each process its rows
    assert magmax.planned_host(model, 4, 5) == {"merge state (3 float32 copies)": 3 * fp32 // 4}
    svd = opcm.planned_host(model, 1, 5)["merge pass: a layer's SVD (float32)"]
    # the largest linear layer, lm_head 512 x 64: its two task vectors, the projection and its
    # product (4 x 512 x 64), the thin U (512 x 64) and V^T (64 x 64)
    assert svd == 4 * (4 * 512 * 64 + 64 * (512 + 64))


def test_a_run_resumed_between_tasks_restarts_magmax_from_the_restored_fine_tuned_weights(tmp_path, cache_dir):
    """The stage checkpoint after task 1 holds the merge; task 2 must start from theta_1, which only
    the method's restored state has (no step checkpoint to fall back on)."""
    from cl_bench.stream_run import run

    overrides = [*TINY, "method=magmax", "tasks.order=[arith,code]", "checkpoint.keep_stages=null"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run(compose_config(overrides, whole, cache_dir), whole)
    run(compose_config(overrides, cut, cache_dir), cut)
    (cut / "checkpoints" / "stage-002.pt").unlink()
    assert not list((cut / "checkpoints").glob("task-001-step-*"))
    kept = (cut / "checkpoints" / "stage-001.pt").stat().st_mtime_ns
    run(compose_config(overrides, cut, cache_dir), cut)  # goes on from stage-001
    assert (cut / "checkpoints" / "stage-001.pt").stat().st_mtime_ns == kept  # task 1 was not trained again
    w1, w2 = (torch.load(d / "checkpoints" / "stage-002.pt", weights_only=True)["model"] for d in (whole, cut))
    assert all(torch.equal(w1[n], w2[n]) for n in w1)


@pytest.mark.parametrize("name", list(MERGERS))
def test_tasks_that_moved_no_weight_merge_to_the_pretrained_weights(name, monkeypatch):
    """A task can leave the weights where they started (every group's rewards equal under GRPO, a
    learning rate of 0): each merge is theta_0 then, finite (OPCM's rescaling would divide 0 by 0)."""
    if name == "fisher_merge":
        monkeypatch.setattr(
            "methods.fisher_merge.diagonal_fisher",
            lambda model, batches, params, mode, num: (
                {n: torch.ones_like(p) for n, p in params.items()},
                {"seconds": 0},
            ),
        )
    method = MERGERS[name]()
    module = tiny_module(method)
    method.on_stream_start(module, None)
    theta0 = _weights(module.model)
    for t in range(3):
        module.start_task_weights(tiny_task(), t)
        module.merge_after_task(tiny_task(), t)
        # a weighted average of theta_0 with itself: theta_0 up to the division's rounding
        assert_states(
            _weights(module.model), theta0, **({"rtol": 1e-6, "atol": 0} if name == "fisher_merge" else EXACT)
        )
