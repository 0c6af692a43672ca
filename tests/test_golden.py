"""Refactors keep behaviour: the tiny stream's score matrix and final weights, per method, equal
values recorded before the runner was split into cl_bench/ (tests/golden/stream.json).

On the machine kind the values were recorded on (same CPU model, torch version and CPU kernel
set) the final weights must be bitwise equal (one SHA-256 over every tensor's bytes); elsewhere
float kernels may round differently, and each tensor's float64 sum is compared to 1e-5 instead.
The score matrix is compared exactly everywhere: it is made of generated text scored by metrics.

Re-record only for an intended change of behaviour: ``python -m tests.test_golden``.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

import pytest
import torch

from cl_bench.stream_run import run
from tests.conftest import compose_config

GOLDEN = Path(__file__).with_name("golden") / "stream.json"
METHODS = ("sft", "ewc", "fggm", "migu")


def machine() -> str:
    """What decides float rounding here: the CPU model, torch's version and its CPU kernel set."""
    model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    return f"{model} | torch {torch.__version__} | {torch.backends.cpu.get_cpu_capability()}"


def run_method(method: str, out_dir: Path, cache_dir: Path) -> dict:
    """The tiny stream (conftest's TINY settings) for one method: R and a digest of the final weights."""
    from tests.conftest import TINY

    cfg = compose_config([*TINY, f"method={method}", "checkpoint.every_n_steps=null"], out_dir, cache_dir)
    recorder = run(cfg, out_dir)
    (last,) = sorted((out_dir / "checkpoints").glob("stage-*.pt"))[-1:]
    weights = torch.load(last, weights_only=True)["model"]
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].contiguous().view(torch.uint8).numpy().tobytes())
    return {
        "R": recorder.R,
        "sha256": digest.hexdigest(),
        "sums": {n: weights[n].double().sum().item() for n in sorted(weights)},
    }


@pytest.mark.parametrize("method", METHODS)
def test_the_stream_is_unchanged(method, tmp_path):
    golden = json.loads(GOLDEN.read_text())
    expected = golden["methods"][method]
    got = run_method(method, tmp_path / "run", tmp_path / "cache")
    assert got["R"] == expected["R"]
    if golden["machine"] == machine():
        assert got["sha256"] == expected["sha256"], "final weights are not bitwise equal to the recorded run"
    else:
        assert got["sums"] == pytest.approx(expected["sums"], rel=1e-5, abs=1e-6)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        record = {
            "machine": machine(),
            "methods": {m: run_method(m, Path(tmp) / m, Path(tmp) / "cache") for m in METHODS},
        }
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
    print(f"recorded {GOLDEN} on {record['machine']}", file=sys.stderr)
