"""A command-line key that is not in the config gets one line naming the closest existing key.

Hydra answers ``optimzer.lr=0.1`` with five lines that end in the wrong fix ("To append to your
config use +optimzer.lr=0.1", which would add a setting nothing reads). :func:`suggest_closest_keys`
wraps the one Hydra step that applies command-line overrides to the composed config: where a key is
missing there, the error names the override and the closest keys that exist (``difflib``), and
says how to add a new key for the rare case that was meant.
"""

from __future__ import annotations

import difflib
import functools

from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError


def config_keys(cfg: DictConfig) -> list[str]:
    """Every dotted key of ``cfg``, nodes and leaves, unresolved (``optimizer``, ``optimizer.lr``)."""
    keys = []

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                keys.append(f"{prefix}{k}")
                walk(v, f"{prefix}{k}.")

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return keys


def unknown_key_message(override: str, key: str, keys: list[str]) -> str:
    """The one-line error for a command-line ``override`` whose ``key`` the config lacks."""
    if not key.startswith("hydra."):
        keys = [k for k in keys if not k.startswith("hydra")]
    same_depth = [k for k in keys if k.count(".") == key.count(".")]  # a leaf for a leaf, a group for a group
    close = difflib.get_close_matches(key, same_depth, n=3, cutoff=0.6) or difflib.get_close_matches(
        key, keys, n=3, cutoff=0.6
    )
    value = override.split("=", 1)[1] if "=" in override else "..."
    hint = (
        f"did you mean {' or '.join(repr(k) for k in close)}? (e.g. {close[0]}={value})"
        if close
        else "the settings are listed by `python -m runners.cl --cfg job`"
    )
    return (
        f"no setting '{key}' in the config ({override}): {hint}. "
        f"A new key that a plugin reads is added with a leading +: +{override}"
    )


def suggest_closest_keys() -> None:
    """Install the one-line error for unknown command-line keys (idempotent)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    apply = ConfigLoaderImpl._apply_overrides_to_config
    if getattr(apply, "suggests_keys", False):
        return

    @functools.wraps(apply)
    def apply_or_suggest(overrides, cfg):
        try:
            return apply(overrides, cfg)
        except ConfigCompositionException as e:
            if not isinstance(e.__cause__, (ConfigAttributeError, ConfigKeyError)):
                raise
            failed = next((o for o in overrides if str(e).startswith(f"Could not override '{o.key_or_group}'")), None)
            if failed is None:
                raise
            raise ConfigCompositionException(
                unknown_key_message(failed.input_line, failed.key_or_group, config_keys(cfg))
            ) from None

    apply_or_suggest.suggests_keys = True
    ConfigLoaderImpl._apply_overrides_to_config = staticmethod(apply_or_suggest)
