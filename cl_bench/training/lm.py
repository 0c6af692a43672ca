"""Forward passes of a causal LM on a left-padded batch, scoring only the labelled tokens.

With left padding every sequence ends at the last position, so the labelled tokens (answer + EOS)
all lie in the batch's last K positions. The LM head and the softmax are computed for those
positions only (transformers' ``logits_to_keep``): the values are those of the full forward pass,
without the [batch, sequence, vocabulary] logits of the prompt. With TRACE's long prompts and
short answers, and vocabularies of 50k-150k, that is most of the head's cost.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from cl_bench.data.tokenization import IGNORE_INDEX, Collator, position_ids


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode (dropout off) within the block, back in the mode it had after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def labelled_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets): fp32 next-token logits at the positions that predict a labelled token,
    and those tokens (IGNORE_INDEX elsewhere); both [batch, K]."""
    return sequence_and_labelled_logits(model, batch, every_position=False)[1:]


def sequence_and_labelled_logits(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    every_position: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(every position's logits [batch, length, V] as the model computes them (None unless
    ``every_position``), then :func:`labelled_logits`' pair), from one forward pass. The logits of
    every position are what a term over the whole padded sequence needs (TRACE's LwF)."""
    labels = batch["labels"]
    labelled = (labels != IGNORE_INDEX).any(0)
    first = int(labelled.float().argmax()) if labelled.any() else labels.shape[1] - 1
    keep = max(labels.shape[1] - first + 1, 2)  # the position before the first labelled token too
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=position_ids(batch["attention_mask"]),
        use_cache=False,
        logits_to_keep=0 if every_position else keep,
    ).logits
    return (logits if every_position else None), logits[:, -keep:-1].float(), labels[:, -(keep - 1) :]


def shared_prompt_logits(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    group: torch.Tensor,
    pad: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`labelled_logits` for completions that share prompts (GRPO's G completions of each
    prompt), with each prompt's pass computed once: the prompts (left-padded) run once with their
    KV cache kept, the cache rows are repeated for each completion (``group[i]``: completion i's
    prompt), and the completions (right-padded) run on it. Gradients flow through the shared
    cache, so the weights get what the full pass of every row would give them (tested equal to
    float rounding). Returns (fp32 logits [rows, K, V], targets [rows, K]): K the longest
    completion, each row's targets its completion (IGNORE_INDEX after its end)."""
    collate = Collator(pad)
    head = collate([{"input_ids": list(p)} for p in prompts])
    device = next(model.parameters()).device
    head = {k: v.to(device) for k, v in head.items()}
    group = group.to(device)
    first = model(
        input_ids=head["input_ids"],
        attention_mask=head["attention_mask"],
        position_ids=position_ids(head["attention_mask"]),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = first.past_key_values
    cache.reorder_cache(group)  # one cache row per completion (index_select: gradients add up per prompt)
    longest = max(len(c) for c in completions)
    ids = torch.full((len(completions), longest), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(completions):
        ids[i, : len(c)] = torch.tensor(list(c), dtype=torch.long)
        mask[i, : len(c)] = 1
    full = torch.cat([head["attention_mask"][group], mask], 1)
    rest = model(
        input_ids=ids,
        attention_mask=full,
        position_ids=position_ids(full)[:, -longest:],
        past_key_values=cache,
        use_cache=True,
    )
    logits = torch.cat([first.logits[group, -1:], rest.logits[:, :-1]], 1).float()
    return logits, ids.masked_fill(mask == 0, IGNORE_INDEX)


def labelled_mean(values: torch.Tensor, targets: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A per-position quantity [batch, K] reduced as the task loss is: summed over the labelled
    positions and divided by ``batch["loss_normalizer"]`` when the batch has one (the global-batch
    token count / (processes x micro-batches), see cl_bench.data.batching), else their mean. A
    method's per-token term reduced this way is exact under accumulation and DDP, as the loss is."""
    mask = targets != IGNORE_INDEX
    total = (values * mask).sum()
    if "loss_normalizer" in batch:
        return total / batch["loss_normalizer"][0]
    return total / mask.sum().clamp(min=1)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The task loss from :func:`labelled_logits`' output (see :func:`causal_lm_loss`)."""
    if "loss_normalizer" not in batch:
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    total = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / batch["loss_normalizer"][0]


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy over the labelled (answer + EOS) tokens of the batch.

    Summed and divided by ``batch["loss_normalizer"]`` when the batch has one (the global-batch
    token count / (processes x micro-batches), see cl_bench.data.batching); else the batch's token mean.
    """
    return token_cross_entropy(*labelled_logits(model, batch), batch)


def answer_log_likelihood(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(answer | prompt) of each sequence, summed over its labelled tokens."""
    logits, targets = labelled_logits(model, batch)
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)
