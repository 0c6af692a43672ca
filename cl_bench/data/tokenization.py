"""TRACE's tokenization and left-padded collation.

Training input = BOS + prompt + answer + EOS, with labels -100 on BOS, prompt and padding, so the
loss covers exactly the answer tokens and EOS. The prompt is truncated on the left to
``max_prompt_len`` (its end, next to the answer, is kept); the answer on the right to
``max_ans_len``. Generation input = BOS + prompt. Batches are padded on the left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from cl_bench.data.batching import StepIndex
from cl_bench.data.tasks import Example
from cl_bench.data.token_cache import cache_key, cached_encoding

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedText(Example):
    """A training row given as token ids, trained with the full-token LM loss and no BOS or EOS
    added (GeRe's general texts, as its authors tokenise them); ``answer`` holds the decoded text."""

    token_ids: tuple[int, ...] = ()


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, max_prompt_len: int) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    keep = max_prompt_len - len(bos)
    return bos + (ids[-keep:] if keep > 0 else [])


def encode_train(
    tokenizer: PreTrainedTokenizerBase, ex: Example, max_prompt_len: int, max_ans_len: int
) -> dict[str, list[int]]:
    """Token ids and labels for one training example (a :class:`TokenizedText`: its own ids, every
    token after the first labelled)."""
    if isinstance(ex, TokenizedText):
        return {"input_ids": list(ex.token_ids), "labels": [IGNORE_INDEX] + list(ex.token_ids[1:])}
    prompt = _prompt_ids(tokenizer, ex.prompt, max_prompt_len)
    answer = tokenizer(ex.answer, add_special_tokens=False)["input_ids"][: max(max_ans_len - 1, 0)]
    answer = answer + [tokenizer.eos_token_id]
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


def encode_prompt(tokenizer: PreTrainedTokenizerBase, ex: Example, max_prompt_len: int) -> dict[str, list[int]]:
    """Token ids for generating the answer of one example."""
    return {"input_ids": _prompt_ids(tokenizer, ex.prompt, max_prompt_len)}


def left_pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([[value] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class Collator:
    """Left-pads encoded examples into a batch (labels too, when present)."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        ids = [f["input_ids"] for f in features]
        batch = {
            "input_ids": left_pad(ids, self.pad_token_id),
            "attention_mask": left_pad([[1] * len(r) for r in ids], 0),
        }
        if "labels" in features[0]:
            batch["labels"] = left_pad([f["labels"] for f in features], IGNORE_INDEX)
        if "loss_normalizer" in features[0]:
            # one value per row (the same for all: its optimizer step's), so the batch slices like the rest
            batch["loss_normalizer"] = torch.tensor([f["loss_normalizer"] for f in features], dtype=torch.float32)
        if "index" in features[0]:
            batch["index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)
        return batch


class EncodedDataset(torch.utils.data.Dataset):
    """A task split encoded once for training (and cached in ``cache_dir`` when one is given)."""

    def __init__(
        self,
        tokenizer,
        examples: Sequence[Example],
        max_prompt_len: int,
        max_ans_len: int,
        cache_dir: str | Path | None = None,
    ):
        def encode():
            return [encode_train(tokenizer, ex, max_prompt_len, max_ans_len) for ex in examples]

        if cache_dir is None:
            self.items = encode()
        else:
            self.items = cached_encoding(cache_dir, cache_key(tokenizer, examples, max_prompt_len, max_ans_len), encode)

    def __len__(self) -> int:
        return len(self.items)

    #: True: an item also carries its index in the examples (``index``), for a paradigm that reads them
    indexed = False

    def __getitem__(self, i: int | StepIndex) -> dict:
        if isinstance(i, StepIndex):
            item = {**self.items[i.index], "loss_normalizer": i.loss_normalizer}
            return {**item, "index": i.index} if self.indexed else item
        return self.items[i]

    def label_tokens(self) -> list[int]:
        """Per example, the number of tokens the loss is taken on (labelled, after the first position)."""
        return [sum(1 for t in item["labels"][1:] if t != IGNORE_INDEX) for item in self.items]
