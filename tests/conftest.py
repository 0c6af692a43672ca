"""Shared fixtures: compose the real Hydra config with small overrides, tiny-model defaults."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
# The converted SmolLM2 is shared with `make run` (the default paths.cache_dir) so it converts once.
MODEL_CACHE = Path(os.environ.get("CL_BENCH_CACHE", Path.home() / ".cache" / "cl_bench")) / "models"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

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
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[f"paths.output_dir={out_dir}", f"paths.cache_dir={cache_dir}", *overrides],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


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
