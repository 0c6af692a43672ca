"""MIGU: magnitude-based gradient updating (Du et al. 2024, "Unlocking Continual Learning
Abilities in Language Models").

For every nn.Linear (optionally only those whose names match ``module_patterns``), a forward hook
accumulates over all tokens of every micro-batch of the current optimizer step

    n_r = sum_tokens |h_r|,   h = W x                      (one value per output unit r)

At the optimizer step, n is averaged across ranks and, per layer,

    thr = quantile(n, T),   m_r = [n_r >= thr],   grad(W)_{r,:} <- m_r * grad(W)_{r,:}

(T = 0.7: about 30% of the rows, those with the largest outputs, are updated; biases, embeddings
and norms are untouched). An ``lm_head`` tied to the embedding matrix is an ``nn.Linear`` too and
is masked like the others, as the official code does (``mask_tied_head: false`` leaves it, and so
the embedding matrix, unmasked). The mask is rebuilt every optimizer step and the accumulators reset.
Normalising n (as the paper describes) does not change a within-layer quantile and is skipped.
Not applied on the first task (``skip_first_task``). The released code sums padding tokens too;
``ignore_padding: true`` leaves them out. ``random_update: true`` is the ablation that updates a
random 1 - T fraction of rows instead.

The mask depends on the whole accumulation window, so it edits the gradient once per optimizer step
(``edit_gradients``): supported where ``.grad`` is the gradient the optimizer uses (single device,
DDP, and FSDP2, where each process masks the rows it holds), not under DeepSpeed, whose partitioned
gradients are not in ``.grad`` there.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch

from cl_bench.errors import ConfigError, check_fraction
from methods.base import CLMethod


class MIGU(CLMethod):
    name = "migu"
    supported_strategies = ("single_device", "ddp", "fsdp")
    trains_lora = True  # every trainable nn.Linear: under LoRA, each lora_A / lora_B, masked by |A x|, |B A x|
    masks_gradients = True

    def __init__(
        self,
        threshold: float = 0.7,
        skip_first_task: bool = True,
        ignore_padding: bool = False,
        random_update: bool = False,
        module_patterns: Sequence[str] | None = None,
        seed: int = 0,
        mask_tied_head: bool = True,
    ):
        check_fraction(threshold, "method.threshold")
        self.mask_tied_head = mask_tied_head
        self.threshold, self.skip_first_task = threshold, skip_first_task
        self.ignore_padding, self.random_update = ignore_padding, random_update
        if ignore_padding:  # its padding mask is the SFT batch's, not that of a pass over sampled completions
            self.learning_paradigms = ("sft",)
            self.learning_refusal = (
                "ignore_padding reads the SFT batch's attention mask (set method.ignore_padding=false)"
            )
        self.module_patterns = None if module_patterns is None else list(module_patterns)
        self.generator = torch.Generator().manual_seed(seed)
        self.layers: dict[str, torch.nn.Linear] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.handles: list = []
        self.token_mask: torch.Tensor | None = None
        #: the scores and masks of the last optimizer step (telemetry and tests)
        self.last_sums: dict[str, torch.Tensor] = {}
        self.last_masks: dict[str, torch.Tensor] = {}
        self.active = False

    def _linear_layers(self, model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
        # A Linear whose weight is an embedding matrix (a tied lm_head) is masked only if asked.
        embeddings = (
            set()
            if self.mask_tied_head
            else {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        )
        layers = {
            n: m
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m.weight.requires_grad and id(m.weight) not in embeddings
        }
        if self.module_patterns is not None:
            layers = {n: m for n, m in layers.items() if any(fnmatch.fnmatch(n, p) for p in self.module_patterns)}
            if not layers:
                raise ConfigError(f"method.module_patterns {self.module_patterns} match no nn.Linear")
        return layers

    def _record(self, name: str):
        def hook(module, inputs, output):
            if not module.training:
                return
            h = output.detach().abs()
            if self.ignore_padding and self.token_mask is not None:
                h = h * self.token_mask.unsqueeze(-1).to(h.dtype)
            s = h.reshape(-1, h.shape[-1]).sum(0).float()
            self.sums[name] = s if name not in self.sums else self.sums[name] + s

        return hook

    def on_stream_start(self, module, stream) -> None:
        self._linear_layers(module.model)

    def on_task_start(self, module, task, task_index: int) -> None:
        self.active = not (task_index == 0 and self.skip_first_task)
        if not self.active:
            return
        self.layers = self._linear_layers(module.model)
        self.sums = {}
        if not self.random_update:
            self.handles = [m.register_forward_hook(self._record(n)) for n, m in self.layers.items()]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.token_mask = batch.get("attention_mask")

    def row_masks(self, module) -> dict[str, torch.Tensor]:
        """This step's masks: per layer, rows whose summed |W x| (averaged over the processes' data)
        is at or above the T-quantile."""
        if self.random_update:
            return {
                n: torch.rand(m.out_features, generator=self.generator).to(m.weight.device) >= self.threshold
                for n, m in self.layers.items()
            }
        names = list(self.sums)
        sums = [self.sums[n] for n in names]
        module.processes.average(sums)
        self.last_sums = dict(zip(names, sums))
        return {n: s >= torch.quantile(s, self.threshold) for n, s in self.last_sums.items()}

    def edit_gradients(self, module, views) -> None:
        if not self.active:
            return
        masks = self.row_masks(module)
        for n, keep in masks.items():
            weight = self.layers[n].weight
            grad = views.grad(weight)
            if grad is not None:
                grad.mul_(views.rows(weight, keep.unsqueeze(1)).to(grad.dtype))
        self.last_masks = masks
        self.sums = {}
        if module.should_log and masks:
            kept = sum(m.sum().item() for m in masks.values())
            module.log_metrics({"migu/updated_row_fraction": kept / sum(m.numel() for m in masks.values())})

    def planned_state(self, model, world, tasks):
        return {"row sums of |W x|": 4 * sum(m.out_features for m in self._linear_layers(model).values())}

    def state_dict(self):
        """The random_update ablation's generator: a resumed task draws the masks it would have."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state_dict) -> None:
        self.generator.set_state(state_dict["generator"])

    def on_task_end(self, module, task, task_index: int) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.sums, self.active = [], {}, False
