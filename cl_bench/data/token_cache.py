"""Tokenized training splits cached on disk, so a second run does not tokenize again.

A split's encoding is stored under a key that covers everything it depends on: the tokenizer
(its serialized vocabulary and rules, and its special tokens), the length limits and the text of
every example. Any change gives a new key, never a stale encoding. Files are written atomically
and read with ``torch.load(weights_only=True)``; an unreadable file is encoded again and replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from cl_bench.files import atomic_write

log = logging.getLogger(__name__)

Encoded = list[dict[str, list[int]]]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the tokenizer's output."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = [type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return hashlib.sha256((rules + json.dumps(specials)).encode()).hexdigest()


def cache_key(tokenizer, examples: Sequence, max_prompt_len: int, max_ans_len: int) -> str:
    h = hashlib.sha256(tokenizer_fingerprint(tokenizer).encode())
    h.update(json.dumps([max_prompt_len, max_ans_len]).encode())
    for ex in examples:
        h.update(
            json.dumps([ex.prompt, ex.answer, *([list(ex.token_ids)] if hasattr(ex, "token_ids") else [])]).encode()
        )
    return h.hexdigest()[:32]


def _pack(items: Encoded) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor([t for it in items for t in it["input_ids"]], dtype=torch.int64),
        "labels": torch.tensor([t for it in items for t in it["labels"]], dtype=torch.int64),
        "lengths": torch.tensor([len(it["input_ids"]) for it in items], dtype=torch.int64),
    }


def _unpack(packed: dict[str, torch.Tensor]) -> Encoded:
    lengths = packed["lengths"].tolist()
    ids, labels = packed["input_ids"].split(lengths), packed["labels"].split(lengths)
    return [{"input_ids": i.tolist(), "labels": lab.tolist()} for i, lab in zip(ids, labels)]


def cached_encoding(cache_dir: str | Path, key: str, encode: Callable[[], Encoded]) -> Encoded:
    """The encoding stored under ``key`` in ``cache_dir``, or ``encode()`` (then stored)."""
    path = Path(cache_dir).expanduser() / f"{key}.pt"
    if path.is_file():
        try:
            return _unpack(torch.load(path, weights_only=True))
        except Exception as e:  # a truncated or foreign file: encode again
            log.warning("tokenized cache %s is unreadable (%s); encoding again", path, e)
    items = encode()
    atomic_write(path, lambda tmp: torch.save(_pack(items), tmp))
    return items


def stream_fingerprint(stream) -> str:
    """A digest of every task's name and examples in every split: a resume refuses data that changed."""
    h = hashlib.sha256()
    for task in stream:
        h.update(
            json.dumps(
                [
                    task.name,
                    {
                        split: [[e.prompt, e.answer, *([list(e.references)] if e.references else [])] for e in examples]
                        for split, examples in sorted(task.splits.items())
                    },
                ]
            ).encode()
        )
    return h.hexdigest()
