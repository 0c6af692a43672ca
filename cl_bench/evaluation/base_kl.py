"""How far the model has moved from the base model on each task's inputs, along its own answers.

At every stage, for each task's evaluated examples (the first ``eval.max_examples`` of
``eval.split``), along the answer the model itself just generated (greedy, unless eval.do_sample)::

    KL_task = (1 / #tokens) sum_examples sum_t  sum_v pi_base(v | x, y_<t) log( pi_base(v | ..) / pi(v | ..) )

over the answer's tokens and its EOS: the full-vocabulary forward KL at every position of the
model's own answers, averaged per token. The same measure for every learning paradigm (SFT,
GRPO, self-SFT), so their KLs compare; results.json's ``kl_to_base`` is a matrix shaped like R.
The base model is a frozen copy of the untrained weights (under LoRA: the adapters switched off).

This is not RL's Razor's estimator (Shenfeld, Pari, Agrawal 2025, "RL's Razor: Why Online
Reinforcement Learning Forgets Less"), whose forward KL E_{y ~ pi_base}[log pi_base(y|x) / pi(y|x)]
is taken along responses *sampled from the base model* on the new task's inputs and summed per
sequence: here the responses are the evaluated model's own, and the KL is averaged per token.
Both grow as the model moves away from the base; their values do not compare.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from cl_bench.data.tasks import Example, TaskStream
from cl_bench.data.tokenization import IGNORE_INDEX, Collator, encode_train
from cl_bench.distributed import shard, sum_across_ranks
from cl_bench.errors import check_flag
from cl_bench.evaluation.generation import GenerationConfig
from cl_bench.training.lm import eval_mode, labelled_logits


def forward_kl(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(base || model) over the vocabulary at each position ([..., V] -> [...]), clamped at 0: a
    KL is never negative, but the float32 sum over the vocabulary of two (nearly) equal
    distributions rounds to values like -1e-8, which results.json once stored and printed."""
    log_base = torch.log_softmax(base_logits.float(), -1)
    return (log_base.exp() * (log_base - torch.log_softmax(logits.float(), -1))).sum(-1).clamp_min(0.0)


class BaseKL:
    """The base model, kept to measure the KL to it (see the module doc)."""

    @classmethod
    def of_run(cls, eval_cfg: Any, model: torch.nn.Module) -> BaseKL | None:
        """``eval.kl_to_base``: the untrained ``model`` kept (call before any training or restore); None when off."""
        return cls(model) if check_flag(eval_cfg.get("kl_to_base", False), "eval.kl_to_base") else None

    def __init__(self, model: torch.nn.Module):
        #: None under LoRA: the base is the model with its adapters switched off
        self.base = None if hasattr(model, "disable_adapter") else copy.deepcopy(model).requires_grad_(False).eval()

    def base_logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.base is None:
            with model.disable_adapter(), eval_mode(model):
                return labelled_logits(model, batch)[0]
        return labelled_logits(self.base.to(next(model.parameters()).device), batch)[0]

    @torch.no_grad()
    def task_kl(
        self,
        model: torch.nn.Module,
        tokenizer,
        examples: Sequence[Example],
        answers: Sequence[str],
        max_prompt_len: int,
        max_answer_len: int,
        batch_size: int = 16,
    ) -> float:
        """The per-token forward KL along ``answers`` (one per example, the model's own) over this
        process's share of the examples, summed over the processes."""
        rows = [
            encode_train(tokenizer, Example(ex.prompt, answer), max_prompt_len, max_answer_len)
            for ex, answer in zip(shard(examples), shard(answers))
        ]
        device = next(model.parameters()).device
        total = torch.zeros(2, dtype=torch.float64, device=device)
        with eval_mode(model):
            for start in range(0, len(rows), batch_size):
                batch = {
                    k: v.to(device)
                    for k, v in Collator(tokenizer.pad_token_id)(rows[start : start + batch_size]).items()
                }
                logits, targets = labelled_logits(model, batch)
                kl = forward_kl(self.base_logits(model, batch), logits)
                mask = targets != IGNORE_INDEX
                total += torch.stack([kl[mask].sum().double(), mask.sum().double()])
        kl_sum, tokens = sum_across_ranks(total).tolist()
        return kl_sum / tokens if tokens else 0.0

    def stage(
        self,
        model,
        tokenizer,
        stream: TaskStream,
        predictions: dict[str, list[str]],
        split: str,
        max_examples: int | None,
        generation: GenerationConfig,
    ) -> list[float]:
        """One row of the KL matrix: every task of the stream, along the stage's answers (tokenized as
        the evaluation's prompts, each answer up to its generation budget and EOS)."""
        return [
            self.task_kl(
                model,
                tokenizer,
                task.splits[split][:max_examples],
                predictions[task.name],
                generation.max_prompt_len,
                (generation.max_new_tokens or task.spec.max_new_tokens) + 1,
                generation.batch_size,
            )
            for task in stream
        ]
