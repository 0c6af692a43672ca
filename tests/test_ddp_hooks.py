"""Gradient edits at the optimizer step apply to DDP's averaged gradient (2 CPU processes, gloo).

FGGM's mask and EWC's closed-form penalty gradient edit the step's gradient once, through
``ParameterViews``, after gradient accumulation (``no_sync``) and DDP's averaging over its default
buckets (those Lightning uses); every process then holds the same edited gradient, and EWC's
penalty value is the one process's.
"""

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from cl_bench.training.parameter_views import ParameterViews
from methods.ewc import EWC
from methods.shared.masking import GradientMask
from tests.launch import spawn

ROW_MASK = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0]).view(6, 1).bool()
LAMBDA = 5.0


def _inputs(rank: int, micro_batch: int) -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(10 * rank + micro_batch))


def _layer() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 6)


def _state():
    """EWC's consolidated Fisher and anchor for the layer, the same on every rank."""
    g = torch.Generator().manual_seed(1)
    fisher = {"weight": torch.rand(6, 4, generator=g), "bias": torch.rand(6, generator=g)}
    anchor = {n: p.detach() + 0.5 for n, p in _layer().named_parameters()}
    return fisher, anchor


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {}
    for name in ("mask", "ewc"):
        layer = _layer()
        params = dict(layer.named_parameters())
        model = torch.nn.parallel.DistributedDataParallel(layer)
        with model.no_sync():  # two micro-batches: the first accumulates locally
            (model(_inputs(rank, 0)).pow(2).sum() / 2).backward()
        (model(_inputs(rank, 1)).pow(2).sum() / 2).backward()
        views = ParameterViews(layer)
        if name == "mask":
            GradientMask(params, {"weight": ROW_MASK}).apply(views)
        else:
            ewc = EWC(lambda_=LAMBDA)
            ewc.on_stream_start(SimpleNamespace(model=layer), None)
            ewc.load_state_dict({"consolidated": [_state()]})
            ewc.on_train_start(None, SimpleNamespace(model=layer, device=torch.device("cpu")))
            ewc.edit_gradients(None, views)
            results["penalty"] = ewc.penalty_value(views)
            results["saved"] = ewc.state_dict()["consolidated"][0][0]
        results[name] = {n: p.grad.clone() for n, p in params.items()}
    torch.save(results, f"{out}.{rank}")
    dist.barrier()
    # Tearing down gloo DDP reducers at interpreter exit sometimes hangs (seen in about 1 run in
    # 3 here): everything is saved, so leave without running destructors.
    os._exit(0)


def _expected_task_grads() -> dict[str, torch.Tensor]:
    """The plain gradient DDP averages: mean over ranks of the sum over micro-batches / 2."""
    layer = _layer()
    for rank in range(2):
        for micro in range(2):
            (layer(_inputs(rank, micro)).pow(2).sum() / 4).backward()
    return {n: p.grad for n, p in layer.named_parameters()}


def test_step_edits_apply_to_the_averaged_gradient_on_every_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grads.pt")
    spawn(_worker, (port, out))
    plain = _expected_task_grads()
    fisher, anchor = _state()
    full = sum((fisher[n] * (p.detach() - anchor[n]) ** 2).sum() for n, p in _layer().named_parameters())
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        torch.testing.assert_close(got["mask"]["weight"], plain["weight"] * ROW_MASK)
        assert torch.all(got["mask"]["weight"][~ROW_MASK.squeeze(1)] == 0)
        torch.testing.assert_close(got["mask"]["bias"], plain["bias"])  # no mask: untouched
        for n, p in _layer().named_parameters():
            expected = plain[n] + LAMBDA * fisher[n] * (p.detach() - anchor[n])
            torch.testing.assert_close(got["ewc"][n], expected)
        assert got["penalty"] == pytest.approx(0.5 * LAMBDA * full.item(), rel=1e-6)  # not added over processes
        assert sorted(got["saved"]) == ["bias", "weight"] and torch.equal(got["saved"]["bias"], fisher["bias"])
