"""IncLoRA: a new LoRA adapter for every task; the earlier ones stay frozen and keep contributing.

With the peft adapters ``default`` (task 1), ``task2``, ... ``task<t>`` all active, every targeted
Linear of the model computes, while task t trains and from then on:

    h = W x + sum_{i <= t} (alpha / r) B_i A_i x

Only (A_t, B_t) train. A new adapter starts as peft makes it (A kaiming-uniform, B = 0, as
TRACE's O-LoRA re-initialises its ``loranew``), so task t starts from the model task t-1 left;
A is drawn from a seed derived from ``seed`` and t alone.
Stage checkpoints hold every adapter; a resume re-creates the adapters before their weights load.

Under FSDP (``trainer=fsdp``) the model is sharded at the first fit and cannot take new modules
after it: every task's adapter is created at stream start (each from its own seed, so the same
weights), and task t activates the first t of them. An adapter not yet active takes no part in the
forward pass, so the run is the one above; its stage checkpoints also hold the adapters to come.
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
    supported_strategies = ("single_device", "ddp", "fsdp")

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
            raise ConfigError(
                f"method {self.name} adds an adapter at every task, which an optimizer kept over the "
                "stream would not hold: optimizer.reset_per_task must be true"
            )

    @property
    def upfront(self) -> bool:
        """Every task's adapter is created at stream start, before FSDP shards the model."""
        return self.row_shards

    def on_stream_start(self, module, stream) -> None:
        if not hasattr(module.model, "peft_config"):
            raise ConfigError(f"method {self.name} needs a LoRA model (model.lora.enabled=true)")
        self.model = module.model
        self.adapters = [adapter_name(0)]
        if self.upfront:
            for index in range(1, len(stream)):
                self._create(index)

    def on_task_start(self, module, task, task_index: int) -> None:
        while len(self.adapters) <= task_index:
            self._add()
        self._activate()

    def _create(self, index: int) -> None:
        """Task ``index``'s adapter, drawn from its own seed (the same in one process, under DDP and
        created ahead under FSDP); nothing if it exists."""
        name = adapter_name(index)
        if name in self.model.peft_config:
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, f"adapter {index}"))
            self.model.add_adapter(name, self.model.peft_config[adapter_name(0)])

    def _add(self) -> None:
        """The next task's adapter joins the active ones."""
        self._create(len(self.adapters))
        self.adapters.append(adapter_name(len(self.adapters)))

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
        while len(self.adapters) < len(state_dict["adapters"]):
            self._add()
        if self.adapters != state_dict["adapters"]:
            raise ConfigError(
                f"method {self.name}: the checkpoint's adapters {state_dict['adapters']} are not "
                f"this run's {self.adapters}"
            )
        self._activate()
