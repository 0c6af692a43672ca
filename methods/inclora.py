"""IncLoRA: a new LoRA adapter for every task; the earlier ones stay frozen and keep contributing.

With the peft adapters ``default`` (task 1), ``task2``, ... ``task<t>`` all active, every targeted
Linear of the model computes, while task t trains and from then on:

    h = W x + sum_{i <= t} (alpha / r) B_i A_i x

Only (A_t, B_t) train. A new adapter starts as peft makes it (A kaiming-uniform, B = 0, as
TRACE's O-LoRA re-initialises its ``loranew``), so task t starts from the model task t-1 left;
A is drawn from a seed derived from ``seed`` and t alone.
Stage checkpoints hold every adapter; a resume re-creates the adapters before their weights load.
"""
from __future__ import annotations

from typing import Any

import torch

from cl_bench.errors import ConfigError
from cl_bench.models import is_adapter
from cl_bench.rng import derive_seed
from methods.base import CLMethod, trainable_bytes


def adapter_name(task_index: int) -> str:
    """peft's first adapter is ``default`` (built with the model); task t's is ``task<t>`` (1-based)."""
    return "default" if task_index == 0 else f"task{task_index + 1}"


class IncLoRA(CLMethod):
    name = "inclora"
    trains_lora = True

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.model: torch.nn.Module | None = None
        #: the adapters in task order; the last one is the one that trains
        self.adapters: list[str] = []

    def check_run(self, cfg: Any) -> None:
        super().check_run(cfg)
        if not (cfg.model.get("lora") or {}).get("enabled", False):
            raise ConfigError(f"method {self.name} trains one LoRA adapter per task: it needs model.lora.enabled=true")
        if not cfg.optimizer.get("reset_per_task", True):
            raise ConfigError(f"method {self.name} adds an adapter at every task, which an optimizer kept over the "
                              "stream would not hold: optimizer.reset_per_task must be true")

    def on_stream_start(self, module, stream) -> None:
        if not hasattr(module.model, "peft_config"):
            raise ConfigError(f"method {self.name} needs a LoRA model (model.lora.enabled=true)")
        self.model = module.model
        self.adapters = [adapter_name(0)]

    def on_task_start(self, module, task, task_index: int) -> None:
        while len(self.adapters) <= task_index:
            self._add(adapter_name(len(self.adapters)))
        self._activate()

    def _add(self, name: str) -> None:
        """A new adapter, drawn from its own seed (the same in one process and under DDP)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, f"adapter {len(self.adapters)}"))
            self.model.add_adapter(name, self.model.peft_config[adapter_name(0)])
        self.adapters.append(name)

    def _activate(self) -> None:
        """All adapters in the forward pass, only the newest one trainable."""
        self.model.base_model.set_adapter(self.adapters)
        newest = f".{self.adapters[-1]}."
        for n, p in self.model.named_parameters():
            if is_adapter(n):
                p.requires_grad_(newest in n)

    def lora_layers(self) -> list[torch.nn.Module]:
        """The model's LoRA layers (each has ``lora_A`` / ``lora_B`` dicts keyed by adapter)."""
        return [m for m in self.model.modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)]

    def planned_state(self, model, world, tasks):
        return {"earlier tasks' adapters (frozen)": (tasks - 1) * trainable_bytes(model)}

    def state_dict(self):
        return {"adapters": list(self.adapters)}

    def load_state_dict(self, state_dict) -> None:
        """Re-create the adapters of the finished tasks (their weights load next, from the stage)."""
        for name in state_dict["adapters"][len(self.adapters):]:
            self._add(name)
        self._activate()
