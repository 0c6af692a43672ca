"""Building objects from config nodes (every layer uses this; the run's own checks are in
cl_bench/run_config.py)."""

from __future__ import annotations

import inspect
import os
import re
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cl_bench.errors import ConfigError, check_flag


def arm_name(learning: str | None, method: str) -> str:
    """What a run learned and with which method, as its name says it: the method under SFT
    (``ewc``), the paradigm for SFT's plain step learned another way (``grpo``), else both
    (``grpo+ewc``). The config's ``${cl_arm:<learning>,<method>}``: run names, W&B's job type."""
    if learning in (None, "", "sft"):
        return method
    return learning if method == "sft" else f"{learning}+{method}"


# registered when this module is imported (runners/cl.py imports it before Hydra resolves anything)
OmegaConf.register_new_resolver("cl_arm", arm_name, replace=True)


def build(node: DictConfig, **kwargs):
    """``instantiate``, letting our own ConfigError through unwrapped (it already names the key),
    a ``_target_`` that fails to import (a plugin with a bug) reported in one line: the target,
    the file and line where the import failed, and the exception (Hydra's own message says only
    "Error locating target" unless HYDRA_FULL_ERROR=1), and a setting the target does not take
    (``+method.lamdba=2``) named by its key with the settings it does take."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        if str(e).startswith("Error locating target") and e.__cause__ is not None:
            raise ConfigError(f"cannot import {node.get('_target_')}: {_import_failure(e.__cause__)}") from e
        unknown = re.search(r"got an unexpected keyword argument '(\w+)'", str(e.__cause__ or ""))
        if isinstance(e.__cause__, TypeError) and unknown and unknown.group(1) in node:
            where = node._get_full_key(None) if isinstance(node, DictConfig) else ""
            target = str(node.get("_target_"))
            raise ConfigError(
                f"{where + '.' if where else ''}{unknown.group(1)}: {target.rsplit('.', 1)[-1]} takes no such "
                f"setting; it takes {', '.join(_settings_of(target)) or 'none'}"
            ) from None
        raise


def _settings_of(target: str) -> list[str]:
    """The keyword settings a ``_target_`` class (or function) takes, its bases' included where its
    ``__init__`` passes ``**kwargs`` on to them."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception:
        return []
    names: list[str] = []
    for cls in obj.__mro__ if isinstance(obj, type) else [obj]:
        function = cls.__init__ if isinstance(cls, type) else cls
        if isinstance(cls, type) and "__init__" not in vars(cls):
            continue
        params = inspect.signature(function).parameters.values()
        names += [
            p.name
            for p in params
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in names
        ]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def _import_failure(error: BaseException) -> str:
    """The innermost exception of an import's chain, with the file and line it was raised at
    outside the import machinery (the plugin's own source), e.g.
    "methods/l2_init.py:3: NameError: name 'CLMethod' is not defined"."""
    while error.__cause__ is not None:
        error = error.__cause__
    frames = [
        f
        for f in traceback.extract_tb(error.__traceback__)
        if "importlib" not in f.filename and f"{os.sep}hydra{os.sep}" not in f.filename
    ]
    where = f"{frames[-1].filename}:{frames[-1].lineno}: " if frames else ""
    return f"{where}{type(error).__name__}: {error}"


def without(node: DictConfig, *keys: str) -> DictConfig:
    """``node`` resolved, less ``keys``: the run-level switches of a node whose other keys build an
    object (``model.lora``, ``tasks.joint``, ``optimizer.reset_per_task``)."""
    return OmegaConf.create({k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in keys})


def optimizer_factory(node: DictConfig) -> tuple[Callable, bool]:
    """The optimizer partial of ``conf: optimizer`` and its ``reset_per_task`` flag (default true:
    a fresh optimizer for every task; false: one optimizer, its moments carried, for the stream)."""
    reset = check_flag(node.get("reset_per_task", True), "optimizer.reset_per_task")
    return build(without(node, "reset_per_task")), reset


def flat_settings(config: dict, leave_out: Iterable[str] = (), prefix: str = "") -> dict[str, Any]:
    """A config tree as dotted keys, less ``leave_out`` (a dotted key covers everything below it)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if any(dotted == k or dotted.startswith(k + ".") for k in leave_out):
            continue
        if isinstance(value, dict):
            out.update(flat_settings(value, leave_out, dotted + "."))
        else:
            out[dotted] = value
    return out


#: ``_target_`` paths that moved: a run recorded before the move reads as today's
MOVED_TARGETS = {"cl_bench.training.module.constant_with_warmup": "cl_bench.training.schedules.constant_with_warmup"}
#: settings retired without changing what a run does where they applied (EWC's and MAS's DDP
#: ``shard_state``: the same penalty gradient from a split state; retired 2026-12-03)
RETIRED_SETTINGS = ("method.shard_state",)


#: settings added since runs were first recorded, with the value every earlier run had in effect, and
#: the setting (and its value) under which each applies (None: always)
ADDED_SETTINGS = (
    ("eval.right_threshold", 50, None),
    ("eval.engine", "hf", None),
    ("eval.kl_to_base", False, None),
    ("model.initializer_range", 0.02, ("model._target_", "cl_bench.models.tiny_llama")),
    ("learning._target_", "cl_bench.training.learning.SFT", None),
    ("learning.right_threshold", 50, ("learning._target_", "cl_bench.on_policy.self_sft.SelfSFT")),
)
#: config groups added since runs were recorded: their settings are added even to a run without the group
NEW_GROUPS = ("learning",)


def current_settings(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat settings (:func:`flat_settings`) recorded by an earlier version, in today's terms: moved
    ``_target_`` paths renamed, retired settings left out, added ones at the value they replaced, and
    the vLLM engine's settings left out where it did not run (``eval.engine=hf``), so a recorded run
    still resumes and still groups with new runs of the same settings."""
    out = {
        k: MOVED_TARGETS.get(v, v) if isinstance(v, str) else v for k, v in flat.items() if k not in RETIRED_SETTINGS
    }
    for key, value, condition in ADDED_SETTINGS:
        applies = condition is None or out.get(condition[0]) == condition[1]
        group = key.split(".")[0]
        if applies and key not in out and (group in NEW_GROUPS or any(k.startswith(group + ".") for k in out)):
            out[key] = value
    if out.get("eval.engine") == "hf":
        out = {k: v for k, v in out.items() if not k.startswith("eval.vllm.")}
    return out
