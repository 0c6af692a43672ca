"""Learning paradigms (learning=sft|grpo|self_sft): GRPO's loss against a restatement of TRL's
GRPOTrainer (trl/trainer/grpo_trainer.py, ``_compute_loss`` and ``_generate_and_score_completions``),
rewards from the task scorers, a learnable tiny task, refusals, resume and processes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from rapidfuzz import fuzz
from rouge_score import rouge_scorer

from cl_bench.errors import ConfigError
from cl_bench.evaluation.metrics import METRICS
from cl_bench.generation.engine import cut_at_eos
from cl_bench.on_policy.grpo import GRPO, token_logps
from cl_bench.on_policy.policy_loss import (
    LOSS_TYPES,
    PolicyLossSettings,
    group_advantages,
    policy_loss,
    zero_std_groups,
)
from cl_bench.on_policy.rewards import TaskScore
from cl_bench.on_policy.rollouts import Rollouts, completion_batch
from cl_bench.stream_run import run


def low_ids(prompts, completions, completion_ids, **columns):
    """A reward the tiny model can learn: the share of its completion's tokens with ids below 256."""
    return [sum(t < 256 for t in ids) / len(ids) for ids in completion_ids]


# --- TRL, restated --------------------------------------------------------------------------------
def trl_advantages(rewards: torch.Tensor, g: int, scale_rewards: str) -> torch.Tensor:
    """TRL: nanmean per group; ``nanstd`` (Bessel-corrected) per group or over the batch; + 1e-4."""

    def nanstd(x):
        n = (~x.isnan()).sum()
        return torch.sqrt(torch.nanmean((x - torch.nanmean(x)) ** 2) * n / (n - 1))

    mean = torch.stack([torch.nanmean(r) for r in rewards.view(-1, g)]).repeat_interleave(g)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = torch.stack([nanstd(r) for r in rewards.view(-1, g)]).repeat_interleave(g)
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return torch.where(rewards.isnan(), torch.zeros_like(adv), adv)


def trl_loss(logps, old, ref, advantages, mask, loss_type, beta, eps_low, eps_high, max_len, num_items, procs=1):
    """TRL's ``_compute_loss`` for one process and no gradient accumulation (token-level ratio)."""
    coef_1 = torch.exp(logps - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * advantages.unsqueeze(1), coef_2 * advantages.unsqueeze(1))
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * (torch.exp(ref - logps) - (ref - logps) - 1)
    m = mask.float()
    if loss_type == "grpo":
        return ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * m).sum() / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * m).sum() / (per_token_loss.size(0) * max_len)
    return (per_token_loss * m).sum() / (num_items / procs)


def hand_made(seed=0, rows=6, length=5):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(rows, length, generator=g) * 3
    old = logps + (torch.rand(rows, length, generator=g) - 0.5)  # ratios far enough from 1 to clip
    ref = logps + (torch.rand(rows, length, generator=g) - 0.5)
    mask = torch.ones(rows, length, dtype=torch.bool)
    mask[0, 3:] = mask[2, 1:] = mask[5, 4:] = False  # completions of different lengths
    advantages = torch.tensor([1.2, -0.7, 0.3, -1.5, 0.0, 0.9])
    return logps, old, ref, mask, advantages


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("clipped", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_the_policy_loss_and_its_gradient_equal_trls(loss_type, clipped, beta):
    logps, old, ref, mask, advantages = hand_made()
    if not clipped:
        old = logps.clone()  # a rollout's first use: the ratio is exactly 1
    settings = PolicyLossSettings(loss_type, 0.2, 0.28, beta)
    mine_in = logps.clone().requires_grad_(True)
    theirs_in = logps.clone().requires_grad_(True)
    budgets = torch.full((6,), 7.0)
    mine, parts = policy_loss(
        mine_in, old, advantages, mask, settings, ref, normalizer=mask.sum().float(), budgets=budgets
    )
    theirs = trl_loss(theirs_in, old, ref, advantages, mask, loss_type, beta, 0.2, 0.28, 7, mask.sum().float())
    assert torch.allclose(mine, theirs, atol=1e-7, rtol=1e-6)
    mine.backward()
    theirs.backward()
    assert torch.allclose(mine_in.grad, theirs_in.grad, atol=1e-7)
    # TRL's clip metrics: a token is clipped where its ratio left the range on the side its advantage pushes
    ratio = torch.exp(logps - old)
    low = (ratio < 0.8) & (advantages[:, None] < 0)
    high = (ratio > 1.28) & (advantages[:, None] > 0)
    assert torch.equal(parts["clipped"], low | high)
    assert bool(parts["clipped"].any()) == clipped
    if clipped:  # a clipped token carries no gradient of the policy term
        no_kl = PolicyLossSettings(loss_type, 0.2, 0.28, 0.0)
        x = logps.clone().requires_grad_(True)
        policy_loss(x, old, advantages, mask, no_kl, None, normalizer=mask.sum().float(), budgets=budgets)[0].backward()
        assert torch.all(x.grad[parts["clipped"]] == 0) and torch.any(x.grad[~parts["clipped"] & mask] != 0)


def test_dapo_divides_by_the_processes_share_of_the_global_token_count():
    logps, old, ref, mask, advantages = hand_made()
    mine, _ = policy_loss(logps, old, advantages, mask, PolicyLossSettings("dapo"), normalizer=torch.tensor(40.0) / 2)
    assert torch.allclose(mine, trl_loss(logps, old, ref, advantages, mask, "dapo", 0, 0.2, 0.2, 0, 40.0, procs=2))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_trls_unscored_completions_included(scale):
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.2, float("nan"), 0.9, 0.4])
    mine = group_advantages(rewards, 4, scale)
    assert torch.allclose(mine, trl_advantages(rewards, 4, scale), atol=1e-6)
    assert mine[9] == 0 and torch.all(mine[4:8] == 0)
    # the first group by hand: mean 0.5, unbiased std sqrt(1/3)
    if scale == "group":
        assert torch.allclose(mine[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (math.sqrt(1 / 3) + 1e-4))


def test_groups_whose_rewards_are_all_equal_are_the_skipped_ones():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.7])
    assert zero_std_groups(rewards, 3).tolist() == [True, True, False]


def test_each_metric_becomes_a_reward_on_0_1_as_its_reference_library_scores_one_example():
    reward = TaskScore()

    def one(metric, completion, answer, prompt="Simplify: The cat sat on the mat. Answer:"):
        return reward(prompts=[prompt], completions=[completion], answer=[answer], metric=[metric])[0]

    assert one("accuracy", " A ", "A") == 1.0 and one("accuracy", "B", "A") == 0.0
    assert one("exact_match", "The Answer.", "the answer") == 1.0 and one("exact_match", "an answer", "answer") == 0.0
    assert one("first_letter_accuracy", "B) yes", "B") == 1.0
    rouge = rouge_scorer.RougeScorer(["rougeL"]).score("the board approved the budget", "the board met")
    assert one("rouge_l", "the board met", "the board approved the budget") == pytest.approx(rouge["rougeL"].fmeasure)
    assert one("edit_similarity", "def f(x): return x", "def f(y): return y") == pytest.approx(
        fuzz.ratio("def f(x): return x", "def f(y): return y") / 100
    )
    sari = one("sari", "The cat sat.", "The cat sat.")
    assert 0 < sari < 1
    for name, metric in METRICS.items():  # every scorer maps to its own score / 100
        value = one(name, "The cat sat.", "The cat sat on it.")
        assert 0 <= value <= 1
        assert value == pytest.approx(
            metric(["The cat sat."], ["The cat sat on it."], ["Simplify: The cat sat on the mat. Answer:"]) / 100
        )


def test_a_completion_ends_at_its_first_eos_and_one_without_is_truncated():
    assert cut_at_eos([5, 6, 2, 0, 0], eos=2) == ([5, 6, 2], False)  # HF's padding after the EOS dropped
    assert cut_at_eos([5, 0, 7], eos=2) == ([5, 0, 7], True)  # a sampled pad token is a token like any
    assert cut_at_eos([5, 6, 7], eos=2) == ([5, 6, 7], True)


# --- GRPO's step on the tiny model ----------------------------------------------------------------
def _grpo_module(**settings):
    from cl_bench.data.tasks import TaskStream
    from methods.sft import SFT as SFTMethod
    from tests.conftest import tiny_module, tiny_task

    grpo = GRPO(num_generations=3, temperature=0.7, **settings)
    module = tiny_module(SFTMethod(), batch_size=2)
    module.learning = grpo
    task = tiny_task()
    grpo.setup(module, TaskStream([task]), module.loaders.tokenizer, 0, 64, False)
    grpo.begin_task(task.train, task.name)
    return module, grpo, task


@pytest.mark.parametrize("shared", [True, False])
def test_the_grpo_step_is_trls_loss_on_the_models_tempered_log_probabilities(monkeypatch, shared):
    """One micro-batch: 2 prompts x 3 completions, one group with equal rewards (skipped), fixed
    rollouts; the step's loss equals TRL's on the model's own log-probabilities at temperature 0.7,
    each row's full pass the reference, whether the update shares each prompt's pass or not."""
    module, grpo, task = _grpo_module(loss_type="grpo", beta=0.1, shared_prompt_pass=shared)
    tok = module.loaders.tokenizer
    prompts = [tok("q1 x3? Answer:", add_special_tokens=False)["input_ids"]] * 3 + [
        tok("q2 x6? Answer:", add_special_tokens=False)["input_ids"]
    ] * 3
    completions = [[5, 6, tok.eos_token_id], [7], [8, 9], [5], [5], [5]]
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.2, 0.2])
    batch = completion_batch(prompts, completions, tok.pad_token_id)
    fixed = Rollouts(
        batch,
        completions,
        rewards,
        torch.zeros(6, dtype=torch.bool),
        torch.full((6,), 4.0),
        [1, 2],
        prompts=[prompts[0], prompts[3]],
    )
    monkeypatch.setattr(grpo, "rollouts", lambda module, batch: fixed)
    monkeypatch.setattr(type(module), "global_step", property(lambda self: 1))  # not a logging step

    loss = grpo.task_loss(module, {"index": torch.tensor([1, 2])})
    from cl_bench.training.lm import labelled_logits

    with torch.no_grad():
        sub = {k: v[:3] for k, v in batch.items()}
        logits, targets = labelled_logits(module.model, sub)
        logps = token_logps(logits, targets, 0.7)
        ref = token_logps(labelled_logits(grpo.base.base, sub)[0], targets, 0.7)
    mask = targets != -100
    expected = trl_loss(
        logps, logps, ref, trl_advantages(rewards, 3, "group")[:3], mask, "grpo", 0.1, 0.2, 0.2, 4, None
    )
    assert torch.allclose(loss.detach(), expected, atol=1e-6)
    assert grpo.step["skipped_groups"] == 1 and grpo.step["trained_rows"] == 3 and grpo.step["groups"] == 2


def test_a_step_whose_groups_are_all_skipped_is_a_zero_loss_that_reaches_the_weights(monkeypatch):
    module, grpo, _ = _grpo_module()
    tok = module.loaders.tokenizer
    batch = completion_batch([[3, 4]] * 3, [[5], [6], [7]], tok.pad_token_id)
    fixed = Rollouts(
        batch,
        [[5], [6], [7]],
        torch.zeros(3),
        torch.zeros(3, dtype=torch.bool),
        torch.full((3,), 4.0),
        [0],
        prompts=[[3, 4]],
    )
    monkeypatch.setattr(grpo, "rollouts", lambda module, batch: fixed)
    loss = grpo.task_loss(module, {"index": torch.tensor([0])})
    loss.backward()
    assert loss.item() == 0 and all(p.grad is not None for p in module.model.parameters() if p.requires_grad)


def test_the_shared_prompt_pass_gives_every_weight_the_full_passes_gradient():
    """Each prompt's pass once for its group (its KV cache shared by the G completions) against
    every row's whole pass: the same log-probabilities at every completion token and the same
    gradient on every weight, to float rounding; the prompts differ in length (padding on both)."""
    from cl_bench.training.lm import labelled_logits, shared_prompt_logits

    module, grpo, task = _grpo_module()
    model, pad = module.model, module.loaders.tokenizer.pad_token_id
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    completions = [[20, 21, 22, 2], [23, 24], [25], [30, 31, 32, 33, 34], [35, 2], [36, 37]]
    group = torch.tensor([0, 0, 0, 1, 1, 1])

    def grads(logits, targets):
        model.zero_grad()
        mask = targets != -100
        logps = token_logps(logits, targets, 0.7)[mask]
        (logps * torch.arange(1, len(logps) + 1)).sum().backward()  # a different weight per token
        return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    full, full_grads = grads(
        *labelled_logits(model, completion_batch([prompts[0]] * 3 + [prompts[1]] * 3, completions, pad))
    )
    shared, shared_grads = grads(*shared_prompt_logits(model, prompts, completions, group, pad))
    assert len(shared) == sum(map(len, completions)) and torch.allclose(shared, full, atol=1e-5)
    for name, g in full_grads.items():
        assert torch.allclose(shared_grads[name], g, atol=1e-5), name


def test_rollouts_are_a_function_of_the_seed_step_and_example_and_leave_the_global_rng_alone():
    module, grpo, task = _grpo_module()
    batch = {"index": torch.tensor([0, 3])}
    state = torch.get_rng_state()
    first = grpo.rollouts(module, batch)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)  # another global state: the same rollouts
    again = grpo.rollouts(module, batch)
    assert first.completions == again.completions and torch.equal(first.rewards, again.rewards)
    alone = grpo.rollouts(module, {"index": torch.tensor([3])})  # prompt 3's group without prompt 0
    assert alone.completions == first.completions[3:]
    assert len({tuple(c) for c in first.completions[:3]}) > 1  # sampled, not greedy


# --- runs -----------------------------------------------------------------------------------------
LEARNABLE = [
    "learning=grpo",
    "learning.reward=tests.test_learning.low_ids",
    "learning.num_generations=4",
    "tasks.order=[arith]",
    "tasks.num_train=32",
    "tasks.epochs=3",
    "optimizer.lr=1e-2",
    "trainer.log_every_n_steps=1",
    "eval.max_examples=2",
]


def test_grpo_learns_a_task_built_for_it_and_records_its_telemetry(make_config, tmp_path):
    """The tiny model's reward rises from chance (about half its tokens below id 256) to nearly all;
    results.json holds the per-step curves and the task's telemetry."""
    recorder = run(make_config(*LEARNABLE), tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "finished"
    task = results["learning"]["tasks"]["arith"]
    curve = task["curves"]["reward_mean"]
    assert task["steps"] == len(curve) == 24
    assert sum(curve[:4]) / 4 < 0.65 and sum(curve[-4:]) / 4 > 0.9, curve
    assert 0 < task["kl_to_base"] and 0 < task["kl_reverse"] and 0 < task["entropy"]
    assert task["clipped"] == 0  # every rollout used once: the ratio is 1
    assert 0 <= task["skipped_groups"] < 1 and task["completion_length"] > 0
    assert results["learning"]["settings"]["loss_type"] == "dapo"
    assert recorder.learning_report == results["learning"]


def test_reused_rollouts_clip_and_each_global_batch_trains_num_iterations_steps(make_config, tmp_path):
    run(make_config(*LEARNABLE, "learning.num_iterations=3", "tasks.epochs=1"), tmp_path / "run")
    task = json.loads((tmp_path / "run" / "results.json").read_text())["learning"]["tasks"]["arith"]
    assert task["steps"] == 24  # 8 global batches x 3
    assert task["clipped"] > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=lwf", "learning=grpo"], "method lwf cannot be combined with learning=grpo: its distillation"),
        (["method=gere", "learning=self_sft"], "method gere cannot be combined with learning=self_sft"),
        (
            ["method=replay", "method.general_data=x.json", "learning=grpo"],
            "its general_data examples belong to no task",
        ),
        (["learning=grpo", "trainer=fsdp"], "learning=grpo runs under trainer strategies"),
        (["learning=grpo", "learning.loss_type=ppo"], "learning.loss_type"),
        (["learning=grpo", "learning.num_generations=1"], "learning.num_generations"),
        (
            ["learning=grpo", "learning.num_iterations=2", "train.micro_batch_size=2"],
            "learning.num_iterations=2 with gradient accumulation .* needs train.drop_last=true",
        ),
        (["method=migu", "method.ignore_padding=true", "learning=grpo"], "ignore_padding reads the SFT batch"),
        (["learning=self_sft", "learning.reward=nowhere.reward"], "learning.reward: cannot import 'nowhere.reward'"),
        # issue 37.15: rewards are 0-1, so nothing would ever pass
        (
            ["learning=self_sft", "learning.threshold=2"],
            r"learning.threshold=2: the task scorers' rewards lie in \[0, 1\]",
        ),
        (
            ["learning=grpo", "learning.reward=tests.test_learning.one_argument"],
            r"learning.reward \(one_argument\) cannot be called with TRL's reward arguments",
        ),
    ],
)
def test_settings_a_paradigm_cannot_run_are_refused_before_the_model_loads(make_config, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run(make_config(*overrides), tmp_path / "run")


def test_a_reward_function_must_return_one_finite_reward_per_completion(make_config, tmp_path):
    with pytest.raises(ConfigError, match="must return one reward per completion: 4 expected, got 1"):
        run(make_config(*LEARNABLE, "learning.reward=tests.test_learning.one_reward"), tmp_path / "run")


def one_reward(prompts, completions, **columns):
    return [1.0]


def one_argument(completions):
    return [1.0] * len(completions)


def words(prompts, completions, **columns):
    return ["0.5"] * len(completions)


def nothing(prompts, completions, **columns):
    return [float("nan"), None, float("inf")] * (len(completions) // 3) + [None] * (len(completions) % 3)


def test_a_reward_that_is_not_a_number_is_refused_naming_learning_reward(make_config, tmp_path):
    """Issue 37.15: a reward function returning strings ("0.5") was read as numbers."""
    with pytest.raises(ConfigError, match=r"learning.reward \(words\) must return numbers .*got str '0.5'"):
        run(make_config(*LEARNABLE, "learning.reward=tests.test_learning.words"), tmp_path / "run")


@pytest.mark.parametrize(
    "overrides, why",
    [
        (["learning.reward=tests.test_learning.nothing"], "the reward function scored no completion"),
        (
            ["learning=self_sft", "learning.threshold=1.0", "learning.reward=tests.test_learning.one_half"],
            "no completion reached learning.threshold",
        ),
    ],
)
def test_a_task_an_on_policy_run_learns_nothing_from_is_warned_recorded_and_reported(
    make_config, tmp_path, caplog, overrides, why
):
    """Issue 37.15: rewards that were all NaN, inf or None, or a threshold nothing passed, ended
    "finished" with no word (the telemetry's reward_mean read 0.0): the task's warning is logged,
    kept in results.json and listed by the report."""
    from cl_bench.recording.reading import find_runs
    from cl_bench.recording.report import write_report

    run(make_config(*LEARNABLE, "tasks.num_train=8", "tasks.epochs=1", *overrides), tmp_path / "run")
    task = json.loads((tmp_path / "run" / "results.json").read_text())["learning"]["tasks"]["arith"]
    assert [w.startswith(why) for w in task["warnings"]] == [True]
    assert "task arith, learning=" in caplog.text and why in caplog.text
    if "nothing" in overrides[0]:
        assert task["reward_mean"] is None and task["unscored"] == 1.0
    write_report(find_runs([tmp_path / "run"]), tmp_path / "report", ["sft"])
    assert f"| arith: {why}" in (tmp_path / "report" / "report.md").read_text()


def one_half(prompts, completions, **columns):
    return [0.5] * len(completions)


def test_a_completion_a_reward_function_does_not_score_is_left_out_of_its_group_as_in_trl():
    from cl_bench.on_policy.rewards import checked_rewards

    rewards = torch.tensor(checked_rewards([None, float("inf"), 0.5, 1.0], 4, "f"))
    assert rewards.isnan().tolist() == [True, True, False, False]
    advantages = group_advantages(rewards, 4, "group")
    assert advantages[:2].tolist() == [0.0, 0.0]  # the group's statistics are those of 0.5 and 1.0 alone
    assert torch.allclose(advantages[2:], torch.tensor([-0.25, 0.25]) / (math.sqrt(0.125) + 1e-4))


def test_self_sft_keeps_right_completions_as_per_example_forgetting_counts_them_by_default():
    from cl_bench.on_policy.self_sft import SelfSFT

    right = SelfSFT(right_threshold=40)
    assert [right.bar(m) for m in ("accuracy", "exact_match", "rouge_l", "edit_similarity", "sari")] == [
        1.0,
        1.0,
        0.4,
        0.4,
        0.4,
    ]
    assert SelfSFT(threshold=0.75).bar("accuracy") == SelfSFT(threshold=0.75).bar("sari") == 0.75


def test_self_sft_trains_only_on_completions_that_pass_the_threshold(make_config, tmp_path):
    run(
        make_config(*LEARNABLE, "learning=self_sft", "learning.threshold=0.75", "tasks.epochs=2"),
        tmp_path / "run",
    )
    task = json.loads((tmp_path / "run" / "results.json").read_text())["learning"]["tasks"]["arith"]
    curve = task["curves"]["reward_mean"]
    assert 0 < task["trained_completions"] < 1
    assert sum(curve[-4:]) / 4 > sum(curve[:4]) / 4 + 0.1, curve


# --- processes and resume -------------------------------------------------------------------------
#: GRPO with EWC on top (a penalty on the policy loss), the KL term on, reward from the task scorers
#: (SARI and edit similarity give the groups a spread)
PROCESS_RUN = [
    "learning=grpo",
    "learning.num_generations=3",
    "learning.beta=0.05",
    "method=ewc",
    "method.num_samples=4",
    "tasks.order=[simplify,code]",
    "eval.max_examples=2",
    "optimizer.lr=1e-2",
]


@pytest.mark.processes
def test_two_gloo_processes_train_grpo_as_one(tmp_path, cache_dir):
    """Global batch 4: two processes with 2 prompts each (each prompt's group on one process) give
    one process's rollouts, rewards, R and weights."""
    from tests.conftest import compose_config
    from tests.test_scale import TINY_RUN, _final, _run_processes

    common = [*TINY_RUN, *PROCESS_RUN, "train.batch_size=4", "checkpoint.keep_stages=null"]
    run(compose_config(common, tmp_path / "single", cache_dir), tmp_path / "single")
    _run_processes([*common, f"hydra.run.dir={tmp_path / 'ddp'}", "trainer=ddp"], "env")
    (r1, w1), (r2, w2) = _final(tmp_path / "single"), _final(tmp_path / "ddp")
    assert r2["status"] == "finished" and r2["R"] == r1["R"]
    for name in ("simplify", "code"):
        one, two = r1["learning"]["tasks"][name], r2["learning"]["tasks"][name]
        # the same rollouts and rewards; their sums differ in float order only
        assert two["curves"]["reward_mean"] == pytest.approx(one["curves"]["reward_mean"], rel=1e-6)
        assert two["completion_length"] == one["completion_length"] and two["skipped_groups"] == one["skipped_groups"]
    first = torch.load(sorted((tmp_path / "single" / "checkpoints").glob("stage-*.pt"))[1], weights_only=True)["model"]
    assert max(float((w1[k] - first[k]).abs().max()) for k in w1) > 1e-4  # task 2 trained the weights
    for k in w1:
        assert torch.allclose(w2[k], w1[k], atol=1e-6), k


@pytest.mark.processes
def test_a_grpo_run_killed_mid_task_resumes_to_the_same_weights(tmp_path, cache_dir):
    """Killed inside task 2 with num_iterations=2 and a step checkpoint asked for every 3 steps: the
    checkpoints fall at multiples of 6, where no rollouts await reuse, and the resumed run's weights,
    R and telemetry equal the uninterrupted run's."""
    from tests.conftest import compose_config
    from tests.test_scale import TINY_RUN, children_threads, kill_inside_task_2

    common = [
        *TINY_RUN,
        *PROCESS_RUN,
        "learning.num_iterations=2",
        "tasks.num_train=16",
        "train.batch_size=2",
        "checkpoint.every_n_steps=3",
    ]
    with children_threads():
        run(compose_config(common, tmp_path / "whole", cache_dir), tmp_path / "whole")
    killed = tmp_path / "killed"
    kill_inside_task_2(common, killed)
    steps = [int(p.stem.rsplit("-", 1)[1]) for p in (killed / "checkpoints").glob("task-001-step-*.ckpt")]
    assert steps and all(step % 6 == 0 for step in steps)
    resumes_to_the_whole_run(common, tmp_path / "whole", killed, tmp_path / "resumed_log")


def resumes_to_the_whole_run(common: list[str], whole, killed, log_dir) -> None:
    """Resume the run ``killed`` inside task 2 (the resume's Hydra log in ``log_dir``): it goes on
    from a step checkpoint of that task and ends with the uninterrupted run's (``whole``) R,
    paradigm telemetry and weights, bitwise."""
    from tests.test_scale import _final, _run

    out = _run([*common, f"resume={killed}", f"hydra.run.dir={log_dir}"])
    assert "Resuming task code from task-001-step-" in out.stdout
    (r1, w1), (r2, w2) = _final(whole), _final(killed)
    assert r2["status"] == "finished" and r2["R"] == r1["R"]
    assert r2["learning"]["tasks"] == r1["learning"]["tasks"]
    for k in w1:
        assert torch.equal(w2[k], w1[k]), k


# --- the KL to the base model ---------------------------------------------------------------------
def test_the_kl_to_base_is_torchs_categorical_kl_averaged_over_the_answer_tokens():
    """BaseKL on a moved copy of the tiny model equals torch.distributions' KL(base || model) at
    every answer position of a full forward pass (no logits_to_keep), averaged per token."""
    from torch.distributions import Categorical, kl_divergence

    from cl_bench.data.tasks import Example
    from cl_bench.data.tokenization import Collator, encode_train
    from cl_bench.evaluation.base_kl import BaseKL
    from cl_bench.models import tiny_llama

    bundle = tiny_llama(seed=0)
    model, tok = bundle.model, bundle.tokenizer
    kl = BaseKL(model)
    assert kl.task_kl(model, tok, [Example("q1 x3? Answer:", "a1")], ["a1 b"], 64, 8) == 0.0  # the base itself
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    examples = [Example("q1 x3? Answer:", "a1"), Example("q22 x66 and more? Answer:", "a22")]
    answers = ["a1 b0", "a2"]
    mine = kl.task_kl(model, tok, examples, answers, 64, 8, batch_size=1)
    total, count = 0.0, 0
    with torch.no_grad():
        for ex, answer in zip(examples, answers):
            row = encode_train(tok, Example(ex.prompt, answer), 64, 8)
            batch = Collator(tok.pad_token_id)([row])
            logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
            base = kl.base(input_ids=batch["input_ids"]).logits[0, :-1]
            labelled = batch["labels"][0, 1:] != -100
            per = kl_divergence(Categorical(logits=base[labelled]), Categorical(logits=logits[labelled]))
            total, count = total + float(per.sum()), count + int(labelled.sum())
    assert mine == pytest.approx(total / count, rel=1e-5) and mine > 0


def test_a_run_with_kl_to_base_records_a_matrix_shaped_like_r_that_starts_at_zero(make_config, tmp_path):
    run(make_config("eval.kl_to_base=true", "tasks.order=[code,simplify]", "optimizer.lr=1e-2"), tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    kl = results["kl_to_base"]
    assert len(kl) == len(results["R"]) == 3 and all(len(row) == 2 for row in kl)
    assert kl[0] == [0.0, 0.0]  # the untrained model is the base
    assert kl[1][0] > 0 and kl[2][1] > 0 and kl[2][0] > 0


# --- methods on top -------------------------------------------------------------------------------
ROLLED_OUT: list[str] = []


def recording_reward(prompts, completions, completion_ids, task, **columns):
    """low_ids, recording which task each rolled-out prompt belongs to."""
    ROLLED_OUT.extend(task)
    return low_ids(prompts, completions, completion_ids)


COMPOSED = [
    "learning=grpo",
    "learning.reward=tests.test_learning.recording_reward",
    "learning.num_generations=2",
    "tasks.order=[arith,code]",
    "tasks.num_train=8",
    "train.batch_size=4",
    "eval.max_examples=2",
    "optimizer.lr=1e-2",
    "checkpoint.keep_stages=null",
]


def _stage_weights(run_dir, k):
    return torch.load(sorted((run_dir / "checkpoints").glob("stage-*.pt"))[k], weights_only=True)["model"]


@pytest.mark.parametrize(
    ("method", "settings"),
    [
        ("replay", ["method.ratio=0.5", "method.mode=interleave", "method.batch_share=0.5"]),
        ("fggm", ["optimizer.weight_decay=0"]),
        ("agem", ["method.per_task=4"]),
        ("ewc", ["method.num_samples=4", "method.lambda_=1e6"]),
        ("inclora", ["model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0"]),
    ],
)
def test_methods_work_on_the_grpo_loss(make_config, tmp_path, method, settings):
    """Replay rolls out on remembered prompts (scored as their own task's); FGGM's frozen rows stay
    bitwise frozen under the policy gradient; A-GEM projects it; EWC's penalty joins it; IncLoRA's
    earlier adapter stays frozen and the base model is the model with its adapters off."""
    ROLLED_OUT.clear()
    run_dir = tmp_path / "run"
    run(make_config(*COMPOSED, f"method={method}", *settings), run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "finished" and set(results["learning"]["tasks"]) == {"arith", "code"}
    after_1, after_2 = _stage_weights(run_dir, 1), _stage_weights(run_dir, 2)
    moved = {k for k in after_2 if k not in after_1 or not torch.equal(after_1[k], after_2[k])}
    assert moved, "task 2 trained nothing"
    if method == "replay":  # task 2's rollouts: its own 8 prompts and 2 remembered ones of arith per batch of 4
        second = ROLLED_OUT[len(ROLLED_OUT) // 2 :]
        assert {"arith", "code"} <= set(second)
    if method == "fggm":  # a matrix's rows outside the mask did not move; about 30% of the rows did
        changed = [(after_1[k] != after_2[k]).any(1) for k in after_2 if after_2[k].dim() == 2]
        share = float(torch.cat(changed).float().mean())
        assert 0 < share <= 0.35
    if method == "inclora":  # the first task's adapter is frozen during the second, the new one trained
        assert not any(".default." in k for k in moved)
        assert any(".task2." in k and "lora_B" in k and bool(after_2[k].any()) for k in after_2)  # B starts at 0


def test_a_kl_is_never_negative_where_float_rounding_would_make_it_so():
    """Issue 37.6: equal distributions gave KLs like -1.08e-08 (stored in results.json and printed);
    the per-position KL is clamped at 0 and still equals torch's where it is positive."""
    from torch.distributions import Categorical, kl_divergence

    from cl_bench.evaluation.base_kl import forward_kl

    logits = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 4
    same = forward_kl(logits, logits.clone() + 1e-3)  # a shift: the same distribution, other rounding
    assert (same >= 0).all() and float(same.max()) < 1e-6
    moved = logits + torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    reference = kl_divergence(Categorical(logits=logits), Categorical(logits=moved))
    torch.testing.assert_close(forward_kl(logits, moved), reference, rtol=1e-5, atol=1e-6)
