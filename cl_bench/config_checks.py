"""Range checks on the run config, done before anything is loaded; each error names its key."""
from __future__ import annotations

from omegaconf import DictConfig

from cl_bench.errors import ConfigError
from cl_bench.tasks import SPLITS


def _get(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        if part not in node:
            raise ConfigError(f"missing config key {key}")
        node = node[part]
    return node


def _check(cfg: DictConfig, key: str, ok, expected: str, allow_none: bool = False) -> None:
    value = _get(cfg, key)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ConfigError(f"{key} must be {expected}, got {value!r}")


def validate_run_config(cfg: DictConfig) -> None:
    positive = lambda v: v > 0  # noqa: E731
    _check(cfg, "optimizer.lr", positive, "> 0")
    _check(cfg, "optimizer.weight_decay", lambda v: v >= 0, ">= 0")
    _check(cfg, "scheduler.warmup_steps", lambda v: int(v) == v and v >= 0, "an integer >= 0")
    for key in ("train.batch_size", "train.max_prompt_len", "eval.batch_size"):
        _check(cfg, key, lambda v: int(v) == v and v >= 1, "an integer >= 1")
    _check(cfg, "train.micro_batch_size", lambda v: int(v) == v and v >= 1, "an integer >= 1 or null", allow_none=True)
    _check(cfg, "checkpoint.every_n_steps", lambda v: int(v) == v and v >= 1, "an integer >= 1 or null", allow_none=True)
    _check(cfg, "checkpoint.keep_steps", lambda v: int(v) == v and v >= 1, "an integer >= 1")
    _check(cfg, "checkpoint.keep_stages", lambda v: int(v) == v and v >= 1, "an integer >= 1 or null", allow_none=True)
    _check(cfg, "train.max_ans_len", lambda v: int(v) == v and v >= 2, "an integer >= 2 (answer + EOS)")
    _check(cfg, "eval.max_examples", lambda v: int(v) == v and v >= 1, "an integer >= 1 or null", allow_none=True)
    _check(cfg, "eval.temperature", positive, "> 0")
    _check(cfg, "eval.top_p", lambda v: 0 < v <= 1, "in (0, 1]")
    if cfg.eval.split not in SPLITS:
        raise ConfigError(f"eval.split must be one of {SPLITS}, got {cfg.eval.split!r}")
