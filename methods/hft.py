"""HFT: half fine-tuning (Hui et al. 2024, "HFT: Half Fine-Tuning for Large Language Models").

At the start of every task, a freshly drawn half of each transformer block's matrices is frozen
for the task (seeded by ``seed`` and the task index):

    attention: 2 of {q, k, v, o} frozen in every block;
    MLP:       2 of {gate, up, down} frozen in half of the blocks, 1 of 3 in the other half.

Frozen matrices get ``requires_grad = False``: the per-task optimizer never sees them, so they
stay bitwise unchanged; everything is unfrozen again at the end of the task. Embeddings, norms
and the LM head keep training. Blocks and matrices are found by name (Llama/Qwen naming by
default: ``layers.<i>.self_attn.q_proj`` ...).
"""
from __future__ import annotations

import random
import re
from collections import defaultdict
from typing import Sequence

import torch

from cl_bench.errors import ConfigError
from cl_bench.rng import derive_seed
from methods.base import CLMethod


class HFT(CLMethod):
    name = "hft"

    def __init__(
        self,
        attention: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
        mlp: Sequence[str] = ("gate_proj", "up_proj", "down_proj"),
        block_pattern: str = r"layers\.(\d+)\.",
        seed: int = 0,
    ):
        if len(attention) != 4 or len(mlp) != 3:
            raise ConfigError("method.attention needs the 4 attention matrices and method.mlp the 3 MLP matrices")
        self.attention, self.mlp = list(attention), list(mlp)
        self.block_re = re.compile(block_pattern)
        self.seed = seed
        self.frozen: list[str] = []

    def blocks(self, model: torch.nn.Module) -> dict[int, dict[str, torch.nn.Parameter]]:
        """block index -> {matrix short name: weight} for every block with all seven matrices."""
        found: dict[int, dict[str, torch.nn.Parameter]] = defaultdict(dict)
        for name, p in model.named_parameters():
            m = self.block_re.search(name)
            short = name.rsplit(".", 2)[-2] if name.endswith(".weight") else None
            if m and short in self.attention + self.mlp:
                found[int(m.group(1))][short] = p
        blocks = {i: mats for i, mats in found.items() if len(mats) == 7}
        if not blocks:
            raise ConfigError(f"method.block_pattern / matrix names match no transformer block of {type(model).__name__}")
        return dict(sorted(blocks.items()))

    def choose(self, n_blocks: int, task_index: int) -> dict[int, list[str]]:
        """The matrices to freeze in each block for this task."""
        rng = random.Random(derive_seed(self.seed, task_index))
        two_mlp = set(rng.sample(range(n_blocks), n_blocks // 2))
        return {b: rng.sample(self.attention, 2) + rng.sample(self.mlp, 2 if b in two_mlp else 1)
                for b in range(n_blocks)}

    def on_stream_start(self, module, stream) -> None:
        self.blocks(module.model)

    def on_task_start(self, module, task, task_index: int) -> None:
        blocks = self.blocks(module.model)
        index = list(blocks)
        plan = self.choose(len(index), task_index)
        self.frozen = []
        for b, names in plan.items():
            for short in names:
                blocks[index[b]][short].requires_grad_(False)
                self.frozen.append(f"{index[b]}.{short}")
        total = sum(p.numel() for mats in blocks.values() for p in mats.values())
        frozen = sum(blocks[index[b]][s].numel() for b, names in plan.items() for s in names)
        module.log_metrics({"hft/frozen_block_fraction": frozen / total, "hft/frozen_matrices": len(self.frozen)})

    def on_task_end(self, module, task, task_index: int) -> None:
        for mats in self.blocks(module.model).values():
            for p in mats.values():
                p.requires_grad_(True)
        self.frozen = []
