"""Random generators: every global RNG's state, a block that leaves them as it found them, and
the one way seeds are derived from a base seed.

Checkpoints store :func:`rng_state` so that a resumed run draws what it would have drawn; code
that must not disturb training's random stream (a benchmark harness that reseeds) runs inside
:func:`preserved_rng`; per-task and per-epoch generators are seeded with :func:`derive_seed`.
"""

from __future__ import annotations

import contextlib
import random
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

#: a prime stride between base seeds: base seeds 1, 2, ... give disjoint derived seeds for keys < it
SEED_STRIDE = 100_003


def derive_seed(seed: int, key: int | str) -> int:
    """The seed of a generator for ``key`` (a task index, an epoch, a task name) under ``seed``."""
    return seed * SEED_STRIDE + (zlib.crc32(key.encode()) if isinstance(key, str) else int(key))


def rng_state() -> dict[str, Any]:
    """Every global RNG's state, in types that ``torch.load(weights_only=True)`` accepts."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(mt), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the global random generators (Python, NumPy, torch CPU and CUDA) on exit."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
