"""What GRPO and self-SFT share: rollouts of the batch's prompts, their rewards, a frozen base
model, and the per-step telemetry.

Per optimizer step (summed over micro-batches and processes), logged under ``rl/`` on logging
steps and summed per task into results.json's ``learning``:

- ``reward_mean``, ``reward_std``: over the step's scored completions (std: population; None when
  none was scored); ``unscored``: the share the reward function did not score (None, NaN, infinity);
- ``skipped_groups``: the share of prompts whose G rewards were all equal (no signal);
- ``completion_length``: mean completion tokens (EOS included); ``truncated``: share without EOS;
- ``clipped``: share of trained completion tokens whose importance ratio was clipped (TRL's
  ``clip_ratio/region_mean``; 0 while every rollout is used once);
- ``entropy``: the policy's mean per-token entropy on its completions (at the sampling temperature);
- ``kl_to_base``: KL(pi_base || pi) per completion token, over the whole vocabulary at each
  position of the policy's own completions of the task's prompts, averaged per token (not RL's
  Razor's estimator, which samples from the base model: cl_bench/evaluation/base_kl.py);
  ``kl_reverse``: KL(pi || pi_base) alike. Entropy and KL are measured on
  logging steps (``trainer.log_every_n_steps``), in one extra pass without gradients.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from hydra.utils import get_method

from cl_bench.data.tokenization import IGNORE_INDEX, encode_prompt
from cl_bench.errors import ConfigError, check_flag, check_number
from cl_bench.evaluation.base_kl import BaseKL, forward_kl
from cl_bench.evaluation.generation import decode
from cl_bench.generation.engine import Engine, HFEngine, cut_at_eos
from cl_bench.on_policy.policy_loss import zero_std_groups
from cl_bench.on_policy.rewards import TaskScore, check_signature, checked_rewards
from cl_bench.on_policy.rollouts import Rollouts, completion_batch
from cl_bench.rng import derive_seed
from cl_bench.training.learning import Learning
from cl_bench.training.lm import eval_mode, labelled_logits

if TYPE_CHECKING:
    from cl_bench.data.tasks import Example, Task, TaskStream

log = logging.getLogger(__name__)

#: what a step sums (over micro-batches and processes) for its telemetry
SUMS = (
    "completions",
    "scored",
    "reward_sum",
    "reward_sq",
    "groups",
    "skipped_groups",
    "completion_tokens",
    "truncated",
    "trained_rows",
    "trained_tokens",
    "clipped_tokens",
    "entropy_sum",
    "kl_to_base_sum",
    "kl_reverse_sum",
    "measured_tokens",
)


def reward_function(reward: Any) -> Callable:
    """``learning.reward``: None (the task's scorer), a callable (an instantiated ``_target_``), or
    the dotted path of a function with TRL's signature."""
    if reward is None:
        return TaskScore()
    if isinstance(reward, str):
        try:
            reward = get_method(reward)
        except Exception as e:
            raise ConfigError(f"learning.reward: cannot import {reward!r}: {e}") from None
    if not callable(reward):
        raise ConfigError(
            f"learning.reward must be a function (a dotted path or a _target_), not {type(reward).__name__}"
        )
    check_signature(reward, getattr(reward, "__name__", type(reward).__name__))
    return reward


def step_metrics(s: dict[str, float]) -> dict[str, float | None]:
    """The telemetry of summed counts (see the module doc); keys absent where nothing was measured.
    The reward's mean and std are over the scored completions (TRL's nanmean), None when none was;
    ``unscored`` is the share the reward function did not score (None, NaN, infinity)."""
    n = max(s["completions"], 1)
    scored = s.get("scored", s["completions"])  # runs recorded before unscored completions were counted
    mean = s["reward_sum"] / scored if scored else None
    out = {
        "reward_mean": mean,
        "reward_std": None if mean is None else math.sqrt(max(s["reward_sq"] / scored - mean**2, 0.0)),
        "unscored": 1 - scored / n,
        "skipped_groups": s["skipped_groups"] / max(s["groups"], 1),
        "completion_length": s["completion_tokens"] / n,
        "truncated": s["truncated"] / n,
        "trained_completions": s["trained_rows"] / n,
        "clipped": s["clipped_tokens"] / max(s["trained_tokens"], 1),
    }
    if s["measured_tokens"]:
        for key in ("entropy", "kl_to_base", "kl_reverse"):
            out[key] = s[f"{key}_sum"] / s["measured_tokens"]
    return out


class OnPolicy(Learning):
    """Rollouts and rewards for a paradigm that learns from the policy's own completions."""

    needs_index = True
    supported_strategies = ("single_device", "ddp")

    def __init__(
        self,
        num_generations: int = 8,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_completion_length: int | None = None,
        reward: Any = None,
        mask_truncated_completions: bool = False,
        kl_telemetry: bool = True,
    ):
        self.num_generations = check_number(num_generations, "learning.num_generations", integer=True, low=2)
        self.temperature = check_number(temperature, "learning.temperature", low=0, low_open=True)
        self.top_p = check_number(top_p, "learning.top_p", low=0, high=1, low_open=True)
        if max_completion_length is not None:
            check_number(max_completion_length, "learning.max_completion_length", integer=True, low=1)
        self.max_completion_length = max_completion_length
        self.reward = reward_function(reward)
        self.mask_truncated = check_flag(mask_truncated_completions, "learning.mask_truncated_completions")
        self.kl_telemetry = check_flag(kl_telemetry, "learning.kl_telemetry")
        self.examples: list[Example] = []
        self.task_of: dict[Example, Task] = {}
        #: the base model (KL term and telemetry), kept when needed
        self.base: BaseKL | None = None
        #: this step's sums (this process's, until end_step reduces them)
        self.step = dict.fromkeys(SUMS, 0.0)
        #: per trained task: its steps' summed telemetry and per-step curves
        self.tasks: dict[str, dict[str, Any]] = {}
        self.task_name = ""

    # --- set-up ------------------------------------------------------------------------------------
    def check_run(self, cfg: Any, method: Any) -> None:
        super().check_run(cfg, method)
        family = method.check_strategy_family(cfg)
        if family not in self.supported_strategies:
            raise ConfigError(
                f"learning={self.name} runs under trainer strategies {list(self.supported_strategies)}; "
                f"trainer.strategy is {family} (its rollouts and frozen base model are not sharded)"
            )

    @property
    def needs_reference(self) -> bool:
        return self.kl_telemetry

    def setup(self, module, stream: TaskStream, tokenizer, seed, max_prompt_len, raw, base=None, engine=None) -> None:
        """``engine``: the run's generation engine (Hugging Face ``generate`` when None)."""
        self.tokenizer, self.seed, self.max_prompt_len, self.raw = tokenizer, seed, max_prompt_len, raw
        self.engine: Engine = engine if engine is not None else HFEngine(batch_size=1 << 30)
        self.task_of = {ex: task for task in stream for ex in task.train}
        if self.needs_reference:  # the base model: the untrained weights (under LoRA: the adapters off)
            self.base = base if base is not None else BaseKL(module.model)

    def begin_task(self, examples: Sequence[Example], task_name: str) -> None:
        self.examples, self.task_name = list(examples), task_name
        for ex in self.examples:
            if ex not in self.task_of:
                raise ConfigError(
                    f"learning={self.name} trains on prompts of the stream's tasks; an example of {task_name}'s "
                    f"training data belongs to none of them (prompt {ex.prompt[:60]!r}): a method that adds "
                    "texts without a task (GeRe's general texts) cannot be combined with it"
                )

    # --- rollouts ----------------------------------------------------------------------------------
    def budget(self, task: Task) -> int:
        return self.max_completion_length or task.spec.max_new_tokens

    def rollouts(self, module, batch: dict[str, torch.Tensor]) -> Rollouts:
        """G completions of every prompt of ``batch`` from the current policy, sampled by the run's
        engine in one call (completion j of prompt i under its own seed, a function of the run's
        seed, the stream step, the example and j), and their rewards."""
        index = batch["index"].tolist()
        tok, g = self.tokenizer, self.num_generations
        examples = [self.examples[i] for i in index]
        tasks = [self.task_of[ex] for ex in examples]
        prompts = [encode_prompt(tok, ex, self.max_prompt_len)["input_ids"] for ex in examples]
        seeds = [derive_seed(self.seed, f"rollout/{module.stream_step}/{i}/{j}") for i in index for j in range(g)]
        # the step and the task: a method may change the weights between tasks without a step
        self.engine.sync(module.model, (self.task_name, module.weights_version))
        ids = self.engine.generate(
            [p for p in prompts for _ in range(g)],
            max(self.budget(task) for task in tasks),
            tok.eos_token_id,
            tok.pad_token_id,
            {"temperature": self.temperature, "top_p": self.top_p},
            seeds,
        )
        completions, truncated, budgets, rewards = [], [], [], []
        for k, (ex, task) in enumerate(zip(examples, tasks)):
            cut = [cut_at_eos(row[: self.budget(task)], tok.eos_token_id) for row in ids[k * g : (k + 1) * g]]
            group = [c for c, _ in cut]
            values = self.reward(
                prompts=[ex.prompt] * g,
                completions=decode(tok, group, self.raw),
                completion_ids=group,
                answer=[ex.scored_against] * g,
                task=[task.name] * g,
                metric=[task.metric] * g,
                trainer_state=SimpleNamespace(global_step=module.stream_step),
            )
            rewards += checked_rewards(values, g, getattr(self.reward, "__name__", type(self.reward).__name__))
            completions += group
            truncated += [t for _, t in cut]
            budgets += [self.budget(task)] * g
        self.engine.rest()
        device = module.device
        rows = [p for p in prompts for _ in range(g)]
        batch = {k: v.to(device) for k, v in completion_batch(rows, completions, tok.pad_token_id).items()}
        return Rollouts(
            batch=batch,
            completions=completions,
            rewards=torch.tensor(rewards, dtype=torch.float32, device=device),
            truncated=torch.tensor(truncated, device=device),
            budgets=torch.tensor(budgets, dtype=torch.float32, device=device),
            index=index,
            prompts=prompts,
        )

    def count_rollouts(self, ro: Rollouts, trained: torch.Tensor) -> None:
        """Add a micro-batch's rollouts to the step's sums (``trained``: [rows] the rows the loss used)."""
        g = self.num_generations
        scored = torch.nan_to_num(ro.rewards, nan=0.0)
        groups = len(ro.rewards) // g
        equal = zero_std_groups(ro.rewards, g)
        mask = ro.batch["labels"] != IGNORE_INDEX
        self.add(
            completions=len(ro.rewards),
            scored=float((~ro.rewards.isnan()).sum()),
            reward_sum=float(scored.sum()),
            reward_sq=float((scored**2).sum()),
            groups=groups,
            skipped_groups=float(equal.sum()),
            completion_tokens=float(mask.sum()),
            truncated=float(ro.truncated.sum()),
            trained_rows=float(trained.sum()),
        )

    def add(self, **values: float) -> None:
        for k, v in values.items():
            self.step[k] += float(v)

    # --- telemetry -----------------------------------------------------------------------------------
    def reference_logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The base model's logits at the batch's labelled positions (no gradient)."""
        with torch.no_grad():
            return self.base.base_logits(model, batch)

    @torch.no_grad()
    def measure(self, module, batch: dict[str, torch.Tensor]) -> None:
        """Entropy and the KL to the base model on the micro-batch's completions (logging steps)."""
        model = module.model
        with eval_mode(model):
            logits, targets = labelled_logits(model, batch)
        mask = targets != IGNORE_INDEX
        logp = torch.log_softmax(logits / self.temperature, -1)
        entropy = -(logp.exp() * logp).sum(-1)
        values = {"entropy_sum": float(entropy[mask].sum()), "measured_tokens": float(mask.sum())}
        if self.kl_telemetry:
            base = self.reference_logits(model, batch)
            forward, reverse = forward_kl(base, logits), forward_kl(logits, base)
            values |= {"kl_to_base_sum": float(forward[mask].sum()), "kl_reverse_sum": float(reverse[mask].sum())}
        self.add(**values)

    def end_step(self, module) -> None:
        """Reduce the step's sums over the processes, log them (logging steps) and add them to the task's."""
        sums = module.processes.sum(
            torch.tensor([self.step[k] for k in SUMS], dtype=torch.float64, device=module.device)
        )
        step = dict(zip(SUMS, sums.tolist()))
        self.step = dict.fromkeys(SUMS, 0.0)
        metrics = step_metrics(step)
        if module.should_log:
            module.log_metrics({f"rl/{k}": v for k, v in metrics.items()})
        record = self.tasks.setdefault(self.task_name, {"steps": 0, "sums": dict.fromkeys(SUMS, 0.0), "curves": {}})
        record["steps"] += 1
        for k, v in step.items():
            record["sums"][k] = record["sums"].get(k, 0.0) + v
        for key in ("reward_mean", "kl_to_base"):
            record["curves"].setdefault(key, []).append(metrics.get(key))

    def unlearned(self, sums: dict[str, float]) -> str | None:
        """Why a task's fit learned nothing from its rollouts, or None; a paradigm adds its reasons."""
        if sums["completions"] and not sums.get("scored", sums["completions"]):
            return "the reward function scored no completion (it gave None, NaN or infinity for every one)"
        return None

    def end_fit(self, module) -> None:
        """A task none of whose rollouts taught anything ends with a warning, also kept in its
        telemetry (results.json's ``learning.tasks.<task>.warnings``, listed by the report)."""
        record = self.tasks.get(self.task_name)
        why = record and self.unlearned(record["sums"])
        if why and why not in record.setdefault("warnings", []):
            record["warnings"].append(why)
            if module.processes.is_main:
                log.warning("task %s, learning=%s: %s; nothing was learned from it", self.task_name, self.name, why)

    def report(self) -> dict[str, Any]:
        """Per trained task: its steps' telemetry (see the module doc), the per-step curves of the
        reward and the KL to the base model (None on steps where the KL was not measured) and the
        warnings of a task that learned nothing (:meth:`end_fit`)."""
        per_task = {
            name: {
                "steps": r["steps"],
                **step_metrics(r["sums"]),
                "curves": r["curves"],
                "warnings": r.get("warnings", []),
            }
            for name, r in self.tasks.items()
        }
        return {"paradigm": self.name, "settings": self.settings(), "tasks": per_task}

    def settings(self) -> dict[str, Any]:
        return {"num_generations": self.num_generations, "temperature": self.temperature, "top_p": self.top_p}

    def state_dict(self) -> dict[str, Any]:
        return {"tasks": copy.deepcopy(self.tasks), "step": dict(self.step)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tasks = copy.deepcopy(state.get("tasks", {}))
        self.step = dict(state.get("step") or dict.fromkeys(SUMS, 0.0))
