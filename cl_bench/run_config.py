"""The run config as a whole: its stream built with its scorers, and every setting outside the
plugins checked by key before anything is loaded."""

from __future__ import annotations

from omegaconf import DictConfig

from cl_bench.config import build, optimizer_factory, without
from cl_bench.data.tasks import SPLITS, TaskStream
from cl_bench.errors import ConfigError, check_choice, check_flag, check_number
from cl_bench.evaluation.matrix_metrics import CL_METRICS
from cl_bench.evaluation.metrics import resolve_metrics
from cl_bench.files import check_writable_dir


def build_stream(tasks: DictConfig) -> TaskStream:
    """The TaskStream of a ``tasks`` config node, each task's metric resolved by its scorer set
    (``tasks.scorers``) and checked; its ``joint`` switch is the run's (not the data's) and its
    ``protocol`` (the published counts, for ``runners.data check``) is not the loader's: both left out."""
    return resolve_metrics(build(without(tasks, "joint", "protocol")))


def _get(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        if part not in node:
            raise ConfigError(f"missing config key {key}")
        node = node[part]
    return node


def validate_run_config(cfg: DictConfig, paths: bool = True) -> None:
    """Every setting of the run outside the plugins (which check their own), by key: ranges, flags,
    the optimizer, and (``paths``) that the token cache can be written."""
    checks = {
        "seed": dict(integer=True, low=0, high=2**32 - 1),  # Lightning's (numpy's) seed range
        "optimizer.lr": dict(low=0, low_open=True),
        "optimizer.weight_decay": dict(low=0),
        "scheduler.warmup_steps": dict(integer=True, low=0),
        "train.batch_size": dict(integer=True, low=1),
        "train.max_prompt_len": dict(integer=True, low=1),
        "eval.batch_size": dict(integer=True, low=1),
        "train.micro_batch_size": dict(integer=True, low=1, allow_none=True),
        "checkpoint.every_n_steps": dict(integer=True, low=1, allow_none=True),
        "checkpoint.keep_steps": dict(integer=True, low=1),
        "checkpoint.keep_stages": dict(integer=True, low=1, allow_none=True),
        "train.max_ans_len": dict(integer=True, low=2),  # the answer's first token and EOS
        "eval.max_examples": dict(integer=True, low=1, allow_none=True),
        "eval.max_new_tokens": dict(integer=True, low=1, allow_none=True),
        "eval.temperature": dict(low=0, low_open=True),
        "eval.top_p": dict(low=0, high=1, low_open=True),
        "eval.right_threshold": dict(low=0, high=100),
    }
    for key, bounds in checks.items():
        check_number(_get(cfg, key), key, **bounds)
    check_choice(cfg.eval.split, SPLITS, "eval.split")
    for key in ("train.shuffle", "train.drop_last", "eval.do_sample"):
        check_flag(_get(cfg, key), key)
    check_number(cfg.trainer.get("gradient_clip_val"), "trainer.gradient_clip_val", low=0, allow_none=True)
    for key, instead in (
        ("max_epochs", "tasks.epochs"),
        ("min_epochs", "tasks.epochs"),
        ("max_steps", "tasks.max_steps"),
    ):
        if key in cfg.trainer:
            raise ConfigError(f"trainer.{key} is not read: each task's budget is {instead} (one value or one per task)")
    objectives = ["op"] if cfg.tasks.get("joint", False) else list(CL_METRICS)
    check_choice(cfg.get("objective", "op"), objectives, "objective")
    check_optimizer(cfg.optimizer)
    if paths and cfg.train.get("token_cache"):
        check_writable_dir(cfg.train.token_cache, "train.token_cache")


def check_optimizer(node: DictConfig) -> None:
    """The optimizer's settings, built over one dummy parameter before the model loads: bad betas,
    a negative eps or a setting the chosen ``_target_`` does not take fail here, naming the key."""
    import torch

    if node.get("eps") is not None:
        check_number(node.eps, "optimizer.eps", low=0)
    betas = node.get("betas")
    if betas is not None and (len(betas) != 2 or any(not isinstance(b, (int, float)) or not 0 <= b < 1 for b in betas)):
        raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {list(betas)}")
    factory, _ = optimizer_factory(node)  # and its reset_per_task flag
    try:
        factory([torch.nn.Parameter(torch.zeros(1))])
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(
            f"optimizer: {node.get('_target_')} refuses the settings under optimizer ({e}); "
            "a setting another optimizer takes can be removed with ~optimizer.<key>"
        ) from None
