"""HFT: half fine-tuning (Hui et al. 2024, "HFT: Half Fine-Tuning for Large Language Models").

At the start of every task, a freshly drawn half of each transformer block is frozen for the task
(seeded by ``seed`` and the task index), chosen by category as the paper's Figure 2 shows:

    attention: 2 of {q, k, v, o} frozen in every block;
    MLP:       2 of {gate, up, down} frozen in half of the blocks, 1 of 3 in the other half;
    norms:     1 of {input_layernorm, post_attention_layernorm} in every block (``norms: []``: none);
    biases follow their matrix (Qwen2's q, k, v biases).

Frozen parameters get ``requires_grad = False``: they get no gradient, so the optimizer (fresh per
task, or carried: a parameter without a gradient is skipped) leaves them bitwise unchanged;
everything is unfrozen again at the end of the task. Embeddings, the final norm and the LM head
keep training. Blocks and matrices are found by name (Llama/Qwen naming by
default: ``layers.<i>.self_attn.q_proj`` ...). Under FSDP (``trainer=fsdp``) the flags are set on the
sharded parameters, which FSDP2 passes on to the gathered ones: a frozen matrix gets no gradient
and is left out of the reduce-scatter.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Sequence

import torch

from cl_bench.errors import ConfigError
from cl_bench.rng import derive_seed
from methods.base import CLMethod


class HFT(CLMethod):
    name = "hft"
    supported_strategies = ("single_device", "ddp", "fsdp")
    lora_refusal = (
        "it trains half of every block's base matrices, which LoRA freezes; its LoRA analogue "
        "is a new adapter per task: method=inclora or olora"
    )

    def __init__(
        self,
        attention: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
        mlp: Sequence[str] = ("gate_proj", "up_proj", "down_proj"),
        norms: Sequence[str] = ("input_layernorm", "post_attention_layernorm"),
        block_pattern: str = r"layers\.(\d+)\.",
        seed: int = 0,
    ):
        if len(attention) != 4 or len(mlp) != 3 or len(norms) not in (0, 2):
            raise ConfigError(
                "method.attention needs the 4 attention matrices, method.mlp the 3 MLP matrices "
                "and method.norms the 2 norms of a block (or [] to train every norm)"
            )
        self.attention, self.mlp, self.norms = list(attention), list(mlp), list(norms)
        self.block_re = re.compile(block_pattern)
        self.seed = seed
        self.frozen: list[str] = []

    def blocks(self, model: torch.nn.Module) -> dict[int, dict[str, list[torch.nn.Parameter]]]:
        """block index -> {module short name: its parameters (weight, and bias if any)} for every
        block that has all of them."""
        wanted = self.attention + self.mlp + self.norms
        found: dict[int, dict[str, list[torch.nn.Parameter]]] = defaultdict(lambda: defaultdict(list))
        for name, p in model.named_parameters():
            m = self.block_re.search(name)
            parts = name.rsplit(".", 2)
            if m and len(parts) == 3 and parts[-2] in wanted and parts[-1] in ("weight", "bias"):
                found[int(m.group(1))][parts[-2]].append(p)
        blocks = {i: dict(mods) for i, mods in found.items() if len(mods) == len(wanted)}
        if not blocks:
            raise ConfigError(
                f"method.block_pattern / module names match no transformer block of {type(model).__name__}"
            )
        return dict(sorted(blocks.items()))

    def choose(self, n_blocks: int, task_index: int) -> dict[int, list[str]]:
        """The modules to freeze in each block for this task."""
        rng = random.Random(derive_seed(self.seed, task_index))
        two_mlp = set(rng.sample(range(n_blocks), n_blocks // 2))
        return {
            b: rng.sample(self.attention, 2)
            + rng.sample(self.mlp, 2 if b in two_mlp else 1)
            + (rng.sample(self.norms, 1) if self.norms else [])
            for b in range(n_blocks)
        }

    def on_stream_start(self, module, stream) -> None:
        self.blocks(module.model)

    def on_task_start(self, module, task, task_index: int) -> None:
        blocks = self.blocks(module.model)
        index = list(blocks)
        plan = self.choose(len(index), task_index)
        self.frozen = []
        for b, names in plan.items():
            for short in names:
                for p in blocks[index[b]][short]:  # a bias follows its weight
                    p.requires_grad_(False)
                self.frozen.append(f"{index[b]}.{short}")
        total = sum(p.numel() for mods in blocks.values() for ps in mods.values() for p in ps)
        frozen = sum(p.numel() for b, names in plan.items() for s in names for p in blocks[index[b]][s])
        module.log_metrics({"hft/frozen_block_fraction": frozen / total, "hft/frozen_modules": len(self.frozen)})

    def on_task_end(self, module, task, task_index: int) -> None:
        for mods in self.blocks(module.model).values():
            for ps in mods.values():
                for p in ps:
                    p.requires_grad_(True)
        self.frozen = []
