"""The parameters as this process holds them: the one place a method's gradient edit and its
per-entry state learn where they live.

A method edits gradients once per optimizer step (:meth:`CLMethod.edit_gradients`), after the
micro-batches' gradients are accumulated and reduced over processes (DDP's mean, FSDP's
reduce-scatter) and before clipping. :class:`ParameterViews` hands it each parameter's weights and
gradient as matching views:

- one process and DDP: whole tensors (every DDP process holds the same reduced gradient);
- FSDP (``trainer=fsdp``): this process's rows of each (FSDP2 shards dim 0).

A method's per-entry state (a Fisher, an anchor, a mask, a gate: tensors named after the
parameters and shaped like them, or broadcast over rows or columns) lines up with those views once
:func:`place_state` has placed it at a fit's start (cut to this process's rows, on the parameters'
device); :func:`whole_state` puts it back together for a checkpoint, and a restored whole state is
placed again at the next fit. A method that truly needs a whole tensor asks :meth:`ParameterViews.whole`
(a collective under FSDP), and :meth:`ParameterViews.rows` cuts a whole result to this process's rows.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from cl_bench.distributed import average_across_ranks, is_distributed
from cl_bench.training.sharding import full_tensor, gather_rows, is_sharded, local, local_rows, rows_of_shards


def trainable_parameters(model: torch.nn.Module, names: Iterable[str] | None = None) -> dict[str, torch.nn.Parameter]:
    """The model's trainable parameters by name (of ``names`` only, when given), looked up now:
    FSDP replaces the parameter objects when it shards the model at the first fit."""
    wanted = None if names is None else set(names)
    return {n: p for n, p in model.named_parameters() if p.requires_grad and (wanted is None or n in wanted)}


class ParameterViews:
    """``model``'s parameters, weights and gradients as this process holds them (module docstring)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        #: FSDP: every view is this process's rows; sums over entries must add every process's
        self.sharded = is_sharded(model)

    def parameters(self, names: Iterable[str] | None = None) -> dict[str, torch.nn.Parameter]:
        return trainable_parameters(self.model, names)

    @staticmethod
    def weight(p: torch.Tensor) -> torch.Tensor:
        """The weights of ``p`` this process holds, detached (edit in place to change the model)."""
        return local(p).detach()

    @staticmethod
    def grad(p: torch.Tensor) -> torch.Tensor | None:
        """The gradient of ``p`` this process holds (edit it in place), None if it has none."""
        return None if p.grad is None else local(p.grad)

    def gradients(self, names: Iterable[str] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (weights, gradient) of every trainable parameter (of ``names``) that has a gradient."""
        return {n: (self.weight(p), self.grad(p)) for n, p in self.parameters(names).items() if p.grad is not None}

    @staticmethod
    def rows(p: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
        """``whole`` (shaped like ``p``, or broadcast over its columns: [rows, 1]) cut to the rows
        this process holds of ``p``; one broadcast over the rows ([1, columns], or a scalar) as it is."""
        if whole.dim() != p.dim() or whole.shape[0] != p.shape[0]:
            return whole
        part = whole[local_rows(p)]
        if part.shape[0] != local(p).shape[0]:
            raise RuntimeError(f"a shard of {local(p).shape[0]} rows is not dim 0's chunk of {p.shape[0]} rows")
        return part

    @staticmethod
    def whole(p: torch.Tensor) -> torch.Tensor:
        """The whole of ``p``, detached, on every process (a collective under FSDP: every process calls it)."""
        return full_tensor(p)

    def total(self, value: torch.Tensor) -> float:
        """A sum over entries (a 0-d tensor) made over this process's views: under FSDP, added over
        every process's rows (a collective), as a Python float in float64."""
        return self.sum_over_shards(value.detach().double().reshape(1)).item()

    def sum_over_shards(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` computed from this process's rows (a column sum, a count) added over every
        process's rows: under FSDP a new tensor (a collective: every process calls it); otherwise
        ``value`` as it is."""
        if not (self.sharded and is_distributed()):
            return value
        device = next((local(p).device for p in self.model.parameters()), value.device)
        out = value.to(device, copy=True)  # on the parameters' device: NCCL reduces CUDA tensors only
        torch.distributed.all_reduce(out)
        return out.to(value.device)

    def whole_rows(
        self, state: dict[str, torch.Tensor], params: dict[str, torch.Tensor] | None = None, cut: bool = False
    ) -> dict[str, torch.Tensor]:
        """Per-entry state held as this process's rows of ``params`` (default: the model's
        parameters by name) put back together, on every process (FSDP: a collective every process
        calls; CPU tensors); otherwise ``state`` as it is. ``cut``: the caller knows the state is
        rows (a state that may also be whole is told apart by its shapes, on each process)."""
        if not (self.sharded and is_distributed() and state):
            return state
        return gather_rows(state, dict(self.model.named_parameters()) if params is None else params, cut)

    def average_replicas(self, tensors: list[torch.Tensor]) -> None:
        """Tensors each process computed from its own data, whole, averaged over the processes in
        place (DDP); under FSDP a backward's reduce-scatter averaged them already."""
        if not self.sharded:
            average_across_ranks(tensors)


def place_state(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A method's per-entry state, named after ``model``'s parameters, as the views of
    :class:`ParameterViews` hold them: under FSDP each whole tensor cut to this process's rows (one
    already cut, or broadcast over rows, kept); on the parameter's device."""
    params = dict(model.named_parameters())
    if is_sharded(model):
        state = rows_of_shards(state, params)
    return {n: t.to(local(params[n]).device) if n in params else t for n, t in state.items()}


def whole_state(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole of a placed per-entry state, for a checkpoint: under FSDP the rows of every process
    put together (a collective: every process calls it); otherwise the state as it is."""
    return ParameterViews(model).whole_rows(state)
