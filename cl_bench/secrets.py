"""Credentials kept out of everything a run writes or prints: configs, checkpoints, Hydra's record,
the loggers' files, the command line W&B records and the log lines of Hydra's launchers.

A credential is a secret-looking key's value (``api_key``, ``wandb_key``, ``token``, ...) or a value
shaped like one whatever its key (a W&B API key's 40 hex digits, the prefixed tokens of Hugging
Face, OpenAI, GitHub, Slack). Configs are code as much as data: a ``_target_`` or ``learning.reward``
runs whatever it names, so only configs from people you trust should be run (docs/failures.md).
"""

from __future__ import annotations

import logging
import re
from typing import Any

_SECRET_KEY = re.compile(r"(^|_)(api_?key|key|secret|password|passwd|token|auth|credentials?)$", re.IGNORECASE)
#: values that are credentials whatever their key: a W&B API key (40 hex digits), and the prefixed
#: tokens of Hugging Face, OpenAI, GitHub and Slack (a git commit id is 40 hex digits too: it is hidden as well)
_SECRET_VALUE = re.compile(r"^([0-9a-f]{40}|(hf|sk|ghp|gho|ghs|xox[abp])[-_][A-Za-z0-9_-]{16,})$")
REDACTED = "<redacted>"


def is_secret(key: str, value: Any) -> bool:
    """A setting that holds a credential: a secret-looking key (``api_key``, ``wandb_key``,
    ``token``, ...) with a value, or a value shaped like one (:data:`_SECRET_VALUE`)."""
    if value is None:
        return False
    return bool(_SECRET_KEY.search(str(key))) or (isinstance(value, str) and bool(_SECRET_VALUE.match(value)))


def redact(obj: Any) -> Any:
    """A copy of a config tree with every credential (:func:`is_secret`) hidden."""
    if isinstance(obj, dict):
        return {k: REDACTED if is_secret(k, v) else redact(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return REDACTED if is_secret("", obj) else obj


def redact_override(override: str) -> str:
    """A command-line override (``+api_token=...``, ``+wandb_key=<40 hex>``) with a credential hidden."""
    key, sep, value = override.partition("=")
    return f"{key}={REDACTED}" if sep and is_secret(key.lstrip("+~").rsplit(".", 1)[-1], value) else override


def redact_words(text: str) -> str:
    """``text`` with every ``key=value`` word that holds a credential hidden (a logged command line)."""
    return " ".join(redact_override(word) if "=" in word else word for word in text.split(" "))


class HideSecrets(logging.Filter):
    """Hides credentials in the ``key=value`` words of a log record (Hydra's launchers log every
    job's overrides: ``#0 : method=ewc +api_token=...``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hidden = redact_words(message)
        if hidden != message:
            record.msg, record.args = hidden, None
        return True


def hide_secrets_in_hydra_logs() -> None:
    """Install :class:`HideSecrets` on the loggers of Hydra's launchers (before Hydra starts a job)."""
    for name in (
        "hydra._internal.core_plugins.basic_launcher",
        "hydra_plugins.hydra_joblib_launcher.joblib_launcher",
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher",
        "hydra_plugins.hydra_optuna_sweeper._impl",
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, HideSecrets) for f in logger.filters):
            logger.addFilter(HideSecrets())
