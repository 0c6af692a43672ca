"""The generation engine of a run: one small interface, two implementations (``eval.engine``).

Everything that generates goes through the run's engine: the stage evaluation, the continual
evaluation and GRPO's and self-SFT's rollouts (the KL to the base model is measured along the
stage's answers). An engine

- :meth:`Engine.sync`: takes the model's current weights (``version``: the stream step; a second
  sync of the same version costs nothing);
- :meth:`Engine.generate`: generates token ids for token-id prompts, greedy or sampled, each request
  under its own seed, and returns every completion up to and including its first EOS;
- :meth:`Engine.rest`: gives back what it holds between uses (vLLM's KV cache);
- :meth:`Engine.close`: frees it at the end of the run.

``hf`` (:class:`HFEngine`) is Hugging Face ``generate`` on the training model itself; ``vllm`` is
cl_bench/generation/vllm_engine.py. Both sample alike: a request's tokens are drawn by its own
generator, seeded by the caller (:class:`SeededSampling`), so a request's draws never depend on what
shares its batch, its process or the run's global random state, and a resumed run draws what the
uninterrupted one did.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from cl_bench.data.tokenization import Collator
from cl_bench.progress import advance
from cl_bench.training.lm import eval_mode


def cut_at_eos(ids: Sequence[int], eos: int) -> tuple[list[int], bool]:
    """A generated row's completion: up to and including its first EOS (HF pads a row only after its
    EOS); without one, the whole row, truncated at the budget. Returns (ids, truncated)."""
    ids = list(ids)
    if eos in ids:
        return ids[: ids.index(eos) + 1], False
    return ids, True


class SeededSampling(LogitsProcessor):
    """Sampling with one generator per row: transformers' temperature and top-p warpers, then each
    row's next token drawn by its own ``torch.Generator`` (seeded once per request), returned as the
    only finite logit so that greedy decoding picks it. ``generate``'s own sampling draws every row
    from the global generator, which ties a row's tokens to its batch; this does not."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device: torch.device):
        self.warpers = [TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
        self.generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        probs = torch.softmax(scores.float(), -1)
        picked = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        out = torch.full_like(scores, -torch.inf)
        return out.scatter_(1, picked[:, None], 0.0)


class Engine:
    """The interface (module docstring); the timings every engine keeps for results.json."""

    name = "engine"

    def __init__(self) -> None:
        #: engine starts, seconds handing weights over, seconds generating
        self.starts = 0
        self.sync_s = 0.0
        self.generate_s = 0.0

    def sync(self, model: torch.nn.Module, version: object = None) -> None:
        raise NotImplementedError

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        eos_token_id: int,
        pad_token_id: int,
        sampling: dict | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[list[int]]:
        """Each prompt's new token ids, in their order, cut after the first EOS (kept): greedy, or
        with ``sampling`` (``temperature``, ``top_p``) each request drawn from its ``seeds`` entry
        (``pad_token_id`` pads a batch where the engine pads)."""
        raise NotImplementedError

    def rest(self) -> None:
        """Between uses: give back what is held (nothing by default)."""

    def close(self) -> None:
        """At the end of the run."""

    def remove_files(self) -> None:
        """The files the engine wrote (none by default)."""

    def restore_timings(self, timings: dict[str, float]) -> None:
        """A resumed run's counters go on from what its record says (:meth:`timings`' keys)."""
        self.starts = int(timings.get("engine_starts", 0))
        self.sync_s = float(timings.get("engine_sync_s", 0.0))
        self.generate_s = float(timings.get("engine_generate_s", 0.0))

    def timings(self) -> dict[str, float]:
        return {"engine_starts": self.starts, "engine_sync_s": self.sync_s, "engine_generate_s": self.generate_s}


class HFEngine(Engine):
    """Hugging Face ``generate`` on the model itself: prompts sorted by length and batched
    ``batch_size`` at a time (less padding), left-padded, with the KV cache."""

    name = "hf"

    def __init__(self, batch_size: int = 16, model: torch.nn.Module | None = None):
        super().__init__()
        self.batch_size = batch_size
        self.model = model

    def sync(self, model: torch.nn.Module, version: object = None) -> None:
        self.model = model  # the training model itself: nothing to hand over

    @torch.no_grad()
    def generate(
        self, prompts, max_new_tokens, eos_token_id, pad_token_id, sampling=None, seeds=None
    ) -> list[list[int]]:
        start = time.perf_counter()
        model = self.model
        device = next(model.parameters()).device
        collate = Collator(pad_token_id)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[list[int]] = [[] for _ in prompts]
        with eval_mode(model):
            for first in range(0, len(order), self.batch_size):
                idx = order[first : first + self.batch_size]
                batch = {k: v.to(device) for k, v in collate([{"input_ids": list(prompts[i])} for i in idx]).items()}
                processors = LogitsProcessorList()
                if sampling:
                    processors.append(
                        SeededSampling([seeds[i] for i in idx], sampling["temperature"], sampling["top_p"], device)
                    )
                rows = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_token_id,
                    eos_token_id=eos_token_id,
                    use_cache=True,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    logits_processor=processors,
                )
                for i, row in zip(idx, rows[:, batch["input_ids"].shape[1] :].tolist()):
                    out[i] = cut_at_eos(row, eos_token_id)[0]
                advance(len(idx))
        self.generate_s += time.perf_counter() - start
        return out
