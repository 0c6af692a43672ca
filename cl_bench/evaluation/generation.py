"""Evaluation by generation: every task of the stream answered by the run's engine
(cl_bench/generation/engine.py) and scored with its metric (0-100)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cl_bench.data.tasks import Example, Task, TaskStream
from cl_bench.data.tokenization import encode_prompt
from cl_bench.distributed import gather_shards, shard
from cl_bench.evaluation.metrics import METRICS
from cl_bench.generation.engine import Engine, HFEngine
from cl_bench.progress import doing
from cl_bench.rng import derive_seed


@dataclass
class GenerationConfig:
    """How answers are generated: greedy by default, TRACE's sampling (temperature 0.1) as an option."""

    batch_size: int = 16
    max_prompt_len: int = 1024
    do_sample: bool = False
    temperature: float = 0.1
    top_p: float = 1.0
    #: new tokens for every task (TRACE generates up to 512 for all); None = each task's own budget
    max_new_tokens: int | None = None
    #: the answers exactly as decoded (no clean-up of tokenization spaces, nothing stripped), as
    #: TRACE scores them; else stripped of surrounding whitespace
    raw: bool = False
    #: the seed of sampled answers (one per request, derived from it and the prompt)
    seed: int = 0

    @classmethod
    def of_run(cls, eval_cfg: Any, max_prompt_len: int, raw: bool, seed: int = 0) -> GenerationConfig:
        """A run's generation settings: its ``eval`` node, ``train.max_prompt_len``, TRACE's raw answers."""
        return cls(
            seed=seed,
            batch_size=eval_cfg.batch_size,
            max_prompt_len=max_prompt_len,
            do_sample=eval_cfg.do_sample,
            temperature=eval_cfg.temperature,
            top_p=eval_cfg.top_p,
            max_new_tokens=eval_cfg.get("max_new_tokens"),
            raw=raw,
        )


@dataclass
class TaskResult:
    score: float
    predictions: list[str] = field(default_factory=list)


def as_engine(source: Engine | PreTrainedModel, batch_size: int) -> Engine:
    """The run's engine, or Hugging Face ``generate`` on a model (a method's own generation)."""
    return source if isinstance(source, Engine) else HFEngine(batch_size, source)


def generate(
    source: Engine | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_new_tokens: int,
    cfg: GenerationConfig,
    seeds: Sequence[int] | None = None,
) -> list[str]:
    """Answers for ``examples``, in their order, by the run's engine (or HF ``generate`` on a model),
    decoded alike whichever engine generated them. A sampled answer's seed is derived from
    ``cfg.seed`` and its prompt, so it is the same in any batch, process or engine restart; or it is
    the ``seeds`` entry (one per example: repeated prompts that must differ)."""
    encoded = [encode_prompt(tokenizer, ex, cfg.max_prompt_len)["input_ids"] for ex in examples]
    sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p} if cfg.do_sample else None
    if seeds is None:
        seeds = [derive_seed(cfg.seed, "|".join(map(str, ids))) for ids in encoded]
    elif len(seeds) != len(examples):
        raise ValueError(f"generate: {len(seeds)} seeds for {len(examples)} examples")
    new = as_engine(source, cfg.batch_size).generate(
        encoded, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, sampling, seeds
    )
    return decode(tokenizer, new, cfg.raw)


def decode(tokenizer: PreTrainedTokenizerBase, new, raw: bool) -> list[str]:
    """Generated token ids as answers: special tokens (EOS, padding) dropped; ``raw`` (TRACE) keeps
    the text exactly as decoded, else it is stripped of surrounding whitespace."""
    texts = tokenizer.batch_decode(
        new, skip_special_tokens=True, **({"clean_up_tokenization_spaces": False} if raw else {})
    )
    return texts if raw else [t.strip() for t in texts]


def evaluate_task(
    engine: Engine | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    cfg: GenerationConfig,
    split: str = "test",
    max_examples: int | None = None,
) -> TaskResult:
    """Score of ``task`` on its first ``max_examples`` examples of ``split``.

    Under several processes each generates for its share of the examples; every process gets all
    predictions back in example order and computes the same score.
    """
    examples = task.splits[split][:max_examples]
    local = generate(engine, tokenizer, shard(examples), cfg.max_new_tokens or task.spec.max_new_tokens, cfg)
    predictions = gather_shards(local, len(examples))
    score = METRICS[task.metric](predictions, [e.scored_against for e in examples], [e.prompt for e in examples])
    return TaskResult(float(score), predictions)


def evaluate_stream(
    engine: Engine | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    stream: TaskStream,
    cfg: GenerationConfig,
    split: str = "test",
    max_examples: int | None = None,
) -> tuple[list[float], dict[str, list[str]]]:
    """One row of the score matrix, every task of the stream (future ones too, so FWT exists),
    and each task's generated answers."""
    scores, predictions = [], {}
    for k, task in enumerate(stream):
        local = len(shard(task.splits[split][:max_examples]))
        doing(f"evaluating {task.name} (task {k + 1}/{len(stream)}), answer", local)
        result = evaluate_task(engine, tokenizer, task, cfg, split, max_examples)
        scores.append(result.score)
        predictions[task.name] = result.predictions
    return scores, predictions
