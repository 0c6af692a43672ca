"""Shared fixtures: compose the real Hydra config with small overrides, tiny-model defaults."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
#: every method a run can choose: conf/method/<name>.yaml (test lists derive from these)
METHOD_NAMES = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))


def method_class(name: str) -> type:
    """The class conf/method/<name>.yaml builds (its ``_target_``, under ``method:`` in a global
    package), for the capabilities it declares (``supported_strategies``, ``trains_lora``)."""
    import yaml

    node = yaml.safe_load((CONF_DIR / "method" / f"{name}.yaml").read_text())
    module, cls = (node.get("method") or node)["_target_"].rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)


# The converted SmolLM2 is shared with `make run` (the default paths.cache_dir) so it converts once.
MODEL_CACHE = Path(os.environ.get("CL_BENCH_CACHE", Path.home() / ".cache" / "cl_bench")) / "models"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Threads: the cores shared out among the suite's workers (pytest-xdist; one each on 2 cores), one
# in every process a test starts (the tiny model's ops are too small to share; process tests start
# two). OMP_NUM_THREADS set by hand wins everywhere.
_THREADS = os.environ.get("OMP_NUM_THREADS")
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(
    int(_THREADS)
    if _THREADS
    else max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
)

pytest_plugins = ["tests.budget", "pytester"]  # a test over its time budget fails; pytester tests the suite


def pytest_collection_modifyitems(items):
    """Modules with SmolLM2 or process tests first (each module's tests kept together, in order):
    with a worker per core, the longest tests start early instead of ending the suite alone."""
    weight = {}
    for item in items:
        module = item.module.__name__
        marks = {m.name for m in item.iter_markers()}
        weight[module] = min(weight.get(module, 2), 0 if "slow" in marks else 1 if "processes" in marks else 2)
    items.sort(key=lambda item: weight[item.module.__name__])


# A quick stream for the tiny model: every task, 1 epoch over 12 examples, 6 scored per task.
TINY = [
    "model=tiny_llama",
    "trainer.enable_progress_bar=false",
    "tasks.epochs=1",
    "tasks.num_train=12",
    "tasks.num_eval=4",
    "tasks.num_test=6",
    "eval.max_examples=6",
    "logger=none",
    "general=none",
]


def compose_config(overrides: list[str], out_dir: Path, cache_dir: Path) -> DictConfig:
    """The config `python -m runners.cl <overrides>` would run with, with paths under tmp dirs."""
    from runners.cl import compose_config as compose_run

    return compose_run([f"paths.output_dir={out_dir}", f"paths.cache_dir={cache_dir}", *overrides], runnable=True)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_config(tmp_path, cache_dir):
    def make(*overrides: str, tiny: bool = True) -> DictConfig:
        base = TINY if tiny else ["general=none"]
        overridden = {o.split("=")[0] for o in overrides}
        base = [b for b in base if b.split("=")[0] not in overridden]  # the test's own value wins
        return compose_config([*base, *overrides], tmp_path / "run", cache_dir)

    return make


def write_stream(root: Path, tasks: dict[str, int], splits=("train", "eval", "test")) -> Path:
    """A fixture stream in TRACE's layout: task name -> number of records per split."""
    for name, n in tasks.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for split in splits:
            records = [{"prompt": f"{name} question {i}? Answer:", "answer": f"{i % 3}", "extra": 1} for i in range(n)]
            (root / name / f"{split}.json").write_text(json.dumps(records))
    return root


def instantiate_with(method):
    """hydra's instantiate, except that a method config yields ``method`` (a test's own object).

    Patch it over ``cl_bench.config.instantiate`` to run the real runner with an instrumented method.
    """
    from hydra.utils import instantiate

    def patched(config, *args, **kwargs):
        if str(config.get("_target_", "")).startswith("methods."):
            return method
        return instantiate(config, *args, **kwargs)

    return patched


def tiny_task(two_word_answers: bool = False):
    """The 8-example task the method tests train on: "q{i} x{3i}? Answer:" -> "a{i}" (or, with
    ``two_word_answers``, "a{i} b{i mod 2}")."""
    from cl_bench.data.tasks import Example, Task, TaskSpec

    answers = [f"a{i} b{i % 2}" if two_word_answers else f"a{i}" for i in range(8)]
    return Task(
        TaskSpec("t", "accuracy", 4),
        {"train": [Example(f"q{i} x{i * 3}? Answer:", a) for i, a in enumerate(answers)]},
        1,
    )


def tiny_module(method, seed: int = 0, batch_size: int = 4, micro_batch_size: int | None = None):
    """A CLModule on the tiny random Llama (seeded) with ``method``, AdamW at lr 1e-3 and loaders of
    global batch ``batch_size`` (prompts up to 64 tokens, answers up to 8)."""
    from functools import partial

    import torch

    from cl_bench.data.loaders import TaskLoaders
    from cl_bench.models import tiny_llama
    from cl_bench.training.module import CLModule

    bundle = tiny_llama(seed=seed)
    loaders = TaskLoaders(
        bundle.tokenizer, batch_size=batch_size, max_prompt_len=64, max_ans_len=8, micro_batch_size=micro_batch_size
    )
    return CLModule(bundle.model, method, partial(torch.optim.AdamW, lr=1e-3), loaders=loaders)
