"""Data loaders over a task's examples: training batches and the methods' passes, built in one place.

:class:`TaskLoaders` holds the run's ``train`` settings and the tokenizer, and makes both kinds of
loader a run needs: this process's share of every global batch for training, and the whole split
in order, in micro-batches, for a method's pass over a task (a Fisher estimate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from cl_bench.data.batching import ResumableLoader, StepBatchSampler
from cl_bench.data.tasks import Example
from cl_bench.data.tokenization import Collator, EncodedDataset


@dataclass(frozen=True)
class TaskLoaders:
    """The loaders of one run (``train`` config + tokenizer); see the module doc."""

    tokenizer: Any
    #: the global batch of one optimizer step
    batch_size: int
    max_prompt_len: int
    max_ans_len: int
    #: examples per forward pass and process; None = the whole per-process batch
    micro_batch_size: int | None = None
    shuffle: bool = False
    drop_last: bool = False
    #: where tokenized splits are cached; None = tokenize every time
    cache_dir: str | Path | None = None

    @classmethod
    def from_config(cls, train, tokenizer) -> TaskLoaders:
        """From the run config's ``train`` node."""
        return cls(
            tokenizer,
            train.batch_size,
            train.max_prompt_len,
            train.max_ans_len,
            train.get("micro_batch_size"),
            train.get("shuffle", False),
            train.get("drop_last", False),
            train.get("token_cache"),
        )

    def training(
        self,
        examples: Sequence[Example],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        fixed_share: tuple[int, int] | None = None,
        indexed: bool = False,
        repeat: int = 1,
    ) -> ResumableLoader:
        """This process (``rank`` of ``world_size``)'s left-padded micro-batches of every global batch,
        epoch by epoch (resumable; see cl_bench.data.batching); ``fixed_share=(own, r)``: r of every
        global batch from ``examples[own:]`` (a replay pool); ``indexed``: each batch carries its rows'
        places in ``examples`` (``index``); ``repeat``: every global batch is trained that many steps
        (GRPO's num_iterations)."""
        dataset = EncodedDataset(self.tokenizer, examples, self.max_prompt_len, self.max_ans_len, self.cache_dir)
        dataset.indexed = indexed
        sampler = StepBatchSampler(
            dataset.label_tokens(),
            self.batch_size,
            self.micro_batch_size,
            rank,
            world_size,
            self.shuffle,
            seed,
            self.drop_last,
            fixed_share,
            repeat,
        )
        # Its own generator: starting an epoch's iterator must not draw from the global RNG.
        return ResumableLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=Collator(self.tokenizer.pad_token_id),
            generator=torch.Generator().manual_seed(seed),
        )

    def passes(self, examples: Sequence[Example]) -> ResumableLoader:
        """All of ``examples`` in order, tokenized as for training, in micro-batches: a method's pass
        batches by the config alone, whatever the number of processes."""
        whole = replace(
            self,
            batch_size=self.micro_batch_size or self.batch_size,
            micro_batch_size=None,
            shuffle=False,
            drop_last=False,
        )
        return whole.training(examples, seed=0)
