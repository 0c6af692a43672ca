"""How each task of the stream is learned (``learning=sft|grpo|self_sft``), a choice beside the method.

A learning paradigm turns a training micro-batch into the task loss; the method then adds its
penalty (``CLMethod.training_loss``) and edits the gradient at the optimizer step, whatever the
paradigm::

    task_loss = learning.task_loss(module, batch)          # SFT: the answer's cross-entropy
    loss      = method.training_loss(module, batch, task_loss)

:class:`SFT` is the default and the framework's original step, operation for operation. The
reinforcement paradigms (cl_bench/on_policy/grpo.py, self_sft.py) sample completions of
the batch's prompts and score them; they read each row's example through the batch's ``index``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from cl_bench.errors import ConfigError
from cl_bench.training.lm import sequence_and_labelled_logits, token_cross_entropy

if TYPE_CHECKING:
    from cl_bench.data.tasks import Example, TaskStream
    from cl_bench.training.method import CLMethod


class Learning:
    """Base of the learning paradigms; the hooks do nothing, :meth:`task_loss` is the paradigm."""

    #: the config's name of the paradigm (``learning=<name>``), which methods declare they support
    name = "sft"
    #: optimizer steps each global batch is trained for (GRPO's ``num_iterations``: its rollouts reused)
    iterations = 1
    #: True when the training batches must carry each row's example index (``batch["index"]``)
    needs_index = False
    #: step checkpoints are taken only at multiples of this (where nothing of a step awaits reuse)
    checkpoint_every = 1

    def check_run(self, cfg: Any, method: CLMethod) -> None:
        """Refuse, before anything loads, a method that cannot learn this way (its declared
        ``learning_paradigms``), naming why."""
        if self.name not in method.learning_paradigms:
            raise ConfigError(
                f"method {method.name} cannot be combined with learning={self.name}: {method.learning_refusal}"
            )

    def setup(
        self,
        module: Any,
        stream: TaskStream,
        tokenizer: Any,
        seed: int,
        max_prompt_len: int,
        raw: bool,
        base: Any = None,
        engine: Any = None,
    ) -> None:
        """Once, with the untrained model, before anything is restored (a reference model is taken
        here); ``base``: the run's kept base model (cl_bench/evaluation/base_kl.py) when it has one;
        ``engine``: the run's generation engine (cl_bench/generation/engine.py), for rollouts."""

    def begin_task(self, examples: Sequence[Example], task_name: str) -> None:
        """The examples the next fit trains on, in the loader's order (``batch["index"]`` indexes them)."""

    def task_loss(self, module: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def loader_options(self) -> dict[str, Any]:
        """What the paradigm needs of the training loader (``TaskLoaders.training``'s ``indexed`` and
        ``repeat``); {}: the loader as SFT has always had it."""
        if not self.needs_index and self.iterations == 1:
            return {}
        return {"indexed": self.needs_index, "repeat": self.iterations}

    def end_step(self, module: Any) -> None:
        """Once per optimizer step, before the method's gradient edit: the step's telemetry."""

    def end_fit(self, module: Any) -> None:
        """After a fit (a task, or an epoch after it): say what the fit could not learn from."""

    def report(self) -> dict[str, Any]:
        """results.json's ``learning`` section (JSON values); {} for SFT."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class SFT(Learning):
    """Supervised fine-tuning: the token mean of the reference answer's cross-entropy (teacher forced)."""

    name = "sft"

    def task_loss(self, module: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        sequence, logits, targets = sequence_and_labelled_logits(module.model, batch, module.method.sequence_logits)
        module.step_logits, module.step_sequence_logits = (logits, targets), sequence
        return token_cross_entropy(logits, targets, batch)
