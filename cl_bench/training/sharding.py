"""FSDP2 (torch's ``fully_shard``) on the run's model: what ``trainer=fsdp`` does.

Lightning's ``ModelParallelStrategy`` starts the processes and builds the device mesh; the
CLModule's ``configure_model`` calls :func:`shard_model` at the first fit: every decoder layer is
one shard unit, the rest (embeddings, final norm, LM head) the root's. Parameters, gradients and
optimizer state are then DTensors sharded on dim 0 (rows) over the data-parallel processes.

Between fits the model stays sharded. What runs outside a fit in lockstep on every process
(evaluation, the general-ability harness) runs inside :func:`full_weights`: every unit is gathered
once for the whole stage, so each process generates its own share of answers without collectives.
Stage checkpoints gather the full state dict on rank 0 (:func:`full_state_dict`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a causal LM: the longest ``nn.ModuleList`` in it."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: torch.nn.Module, mesh) -> None:
    """``fully_shard`` every decoder layer, then the root (once: later fits find it sharded)."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _units(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def full_weights(model: torch.nn.Module) -> Iterator[None]:
    """Every parameter whole on every process inside the block (a no-op for an unsharded model);
    every process must enter it (the gathers are collectives)."""
    units = _units(model) if is_sharded(model) else []
    for unit in units:
        unit.unshard()
        # kept whole through forwards and backwards (a backward would otherwise free the gathered
        # storage that a method may still read, e.g. AGFT's W (.) grad)
        unit.set_reshard_after_forward(False, recurse=False)
        unit.set_reshard_after_backward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)
            unit.set_reshard_after_backward(True, recurse=False)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0 (CPU tensors), empty elsewhere; a plain model's own."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a (sharded) tensor on every process, detached (a collective under FSDP: every
    process must call it); a plain tensor as it is."""
    return tensor.full_tensor().detach() if hasattr(tensor, "full_tensor") else tensor.detach()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor; a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def shard_rows(rows: int, processes: int, index: int) -> slice:
    """The rows of a tensor of ``rows`` rows that FSDP2 gives process ``index`` of ``processes``:
    dim 0 in chunks of ceil(rows / processes), the last ones shorter or empty."""
    chunk = -(-rows // processes)
    start = min(index * chunk, rows)
    return slice(start, min(start + chunk, rows))


def local_rows(tensor: torch.Tensor) -> slice:
    """The rows of the whole tensor that this process's shard of ``tensor`` holds (a plain tensor: all)."""
    if not hasattr(tensor, "device_mesh"):
        return slice(0, tensor.shape[0])
    return shard_rows(tensor.shape[0], tensor.device_mesh.size(), tensor.device_mesh.get_local_rank())


def rows_of_shards(state: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor of ``state`` (a method's per-entry state, whole) cut to the rows this process's
    shard of ``params[name]`` holds; one that is cut already, or not row-shaped like it, is kept."""
    return {
        n: t[local_rows(params[n])].clone()
        if t.shape[0] == params[n].shape[0] and t.shape[0] != local(params[n]).shape[0]
        else t
        for n, t in state.items()
    }


def gather_rows(
    state: dict[str, torch.Tensor], params: dict[str, torch.Tensor], cut: bool = False
) -> dict[str, torch.Tensor]:
    """Row shards of each tensor put back together in rank order on every process (CPU); every
    process must call it. A state that is whole already (e.g. just restored) is returned as it is,
    unless the caller knows it is cut (``cut``: a parameter of one row looks whole on the process
    that holds that row, while the others hold none, and every process must gather alike)."""
    import torch.distributed as dist

    if not cut and all(t.shape[0] == params[n].shape[0] for n, t in state.items()):
        return state
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {n: t.cpu() for n, t in state.items()})
    return {n: torch.cat([part[n] for part in parts]) for n in state}
