"""What a LoRA model evaluates, as one adapter vLLM can load: every active adapter, stacked.

With adapters 1..n active (IncLoRA's and O-LoRA's earlier tasks' adapters and the new one), a
targeted layer computes ``W x + sum_i s_i B_i A_i x`` (``s_i``: adapter i's scaling, alpha / r).
That sum is one product of stacked matrices::

    sum_i s_i B_i A_i  =  [s_1 B_1 | ... | s_n B_n] [A_1; ...; A_n]

so one adapter of rank ``r_1 + ... + r_n`` with A the rows of every A_i, B the columns of every
``s_i B_i`` and scaling 1 (alpha = rank) is exactly the sum, which vLLM's LoRA support applies as
one adapter. peft's ``save_pretrained`` writes each adapter on its own (the first at the folder's
root, the others in sub-folders), so a request naming the folder got the first adapter only.
Layers whose stacked rank is below the largest are padded with zero rows of A and zero columns of
B, which add nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from cl_bench.errors import ConfigError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The model's LoRA layers by module name (each holds ``lora_A``/``lora_B`` keyed by adapter)."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "scaling")}


def active_rank(model: torch.nn.Module) -> int:
    """The rank of the active adapters stacked: the largest over the model's LoRA layers."""
    return max(
        (sum(layer.r[a] for a in layer.active_adapters if a in layer.lora_A) for layer in lora_layers(model).values()),
        default=0,
    )


def stacked_adapter(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], int, list[str]]:
    """The active adapters of a peft ``model`` as one: its tensors keyed as peft saves them, its
    rank, and the targeted module names' last parts."""
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, layer in lora_layers(model).items():
        embedding = [a for a in layer.active_adapters if a in getattr(layer, "lora_embedding_A", {})]
        if embedding:  # peft keeps an embedding's adapters apart from lora_A/lora_B
            raise ConfigError(
                f"eval.engine=vllm hands vLLM the LoRA adapters of linear layers; {name} is an embedding "
                f"with adapters {embedding}: evaluate with eval.engine=hf"
            )
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if not active:
            continue
        if any(not isinstance(layer.lora_A[a], torch.nn.Linear) for a in active):
            raise ConfigError(
                f"eval.engine=vllm hands vLLM the LoRA adapters of linear layers; {name} is "
                f"{type(layer.lora_A[active[0]]).__name__}: evaluate with eval.engine=hf"
            )
        a = torch.cat([layer.lora_A[k].weight.detach().float() for k in active])
        b = torch.cat([layer.lora_B[k].weight.detach().float() * layer.scaling[k] for k in active], dim=1)
        parts[name] = (a, b)
    rank = max((a.shape[0] for a, _ in parts.values()), default=0)
    tensors = {}
    for name, (a, b) in parts.items():
        pad = rank - a.shape[0]
        tensors[f"{name}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).contiguous()
        tensors[f"{name}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1).contiguous()
    targets = sorted({name.rsplit(".", 1)[-1] for name in parts})
    return tensors, rank, targets


def save_stacked_adapter(model: torch.nn.Module, folder: Path, dtype: torch.dtype) -> int:
    """Write the stacked adapter (peft's file layout, ``dtype``) into ``folder``; returns its rank."""
    tensors, rank, targets = stacked_adapter(model)
    if not rank:
        raise ConfigError("eval.engine=vllm: the LoRA model has no active adapter to evaluate")
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype) for k, v in tensors.items()}, str(folder / WEIGHTS))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,  # scaling alpha / r = 1: each adapter's own scaling is in its B
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
    }
    (folder / CONFIG).write_text(json.dumps(config, indent=2))
    return rank
