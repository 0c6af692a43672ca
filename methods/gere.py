"""GeRe: general sample replay with a threshold-based margin loss (Zhang et al. 2025, arXiv
2508.04676; the authors' code is github.com/Qznan/GeRe, gere/gere_trainer.py).

At stream start, with the untrained model: a fixed set of general texts, each tokenised without
BOS or EOS and cut to ``max_length`` tokens (as the authors: ``add_special_tokens=False``, 563
tokens); their final hidden states h* (the lm_head input) at every token; per hidden dimension d,
over all tokens of all texts, mu_d and sigma_d (population variance); and for every stored entry
its band: at or below mu - sigma, strictly between, at or above mu + sigma.

How many general texts a step sees is the method's own setting, never the memory layout's:
- ``mode: batch`` (the default): every optimizer step draws ``per_step`` general texts (seeded,
  cycling through the set in a fresh order each pass, from the stream step), added as extra rows
  to the step's micro-batches (text j of the step to micro-batch j mod (processes x micro-batches));
  a step costs more than SFT's, the task's steps are unchanged.
- ``mode: interleave``: the authors' ``num_interpolate_per_batch``: ``per_step`` general texts take
  slots of every global batch (cl_bench/data/batching.py), a step holds as many rows as SFT's.
- ``mode: concat`` (the authors' default): the texts join every task's training data, shuffled with
  it (an epoch has more steps).
In interleave and concat modes the general rows are recognised by their tokens and their hidden
states read from the step's own forward pass. Either way the loss is (``training_loss``: it
replaces the task loss)

    L  = (CE_general + CE_task) / 2 + w * TM
    TM = (sum of the terms below) / (number of non-zero terms), over every dimension of every
         non-padding token of the drawn texts, h the current hidden state:
           relu(h - (mu - sigma))                         where h* <= mu - sigma   (stay below)
           relu(h - (mu + sigma)) + relu(mu - sigma - h)  where h* is between      (stay inside)
           relu(mu + sigma - h)                           where h* >= mu + sigma   (stay above)
    w  = 100 (``weight: 100``), or (CE_general + CE_task) / 2 / TM without gradient (``weight: dy``)

CE_general is the next-token loss over every token of the drawn texts after the first (full-token
LM loss), and CE_task the task's; in interleave and concat modes both are the micro-batch's token
means over their rows, as the authors compute them; a micro-batch without general rows keeps the
plain task loss. TM is 0
until the weights move. Only the bands are kept (int8), which is all TM reads; the authors keep
the fp32 hidden states on disk. The set is rebuilt from the untrained model when a run resumes
(the statistics are checked against the checkpoint's).

General texts: ``general_data`` (JSON Lines with a ``text`` field, as the authors' SlimPajama
sample) or, by default, ``num_samples`` texts the untrained model writes itself
(methods/shared/general_texts.py).

Under DDP and FSDP the processes share each step's draw in batch mode (FSDP needs every process's
micro-batches to hold the same count, so ``per_step`` must then be a multiple of processes x
micro-batches); in interleave and concat modes they are training rows, laid out over the processes
as any. The statistics come from the whole untrained model on every process (before FSDP shards
it, at the first fit), and the general texts of batch mode run through the whole model's forward,
so FSDP gathers every layer.
"""

from __future__ import annotations

import time

import torch

from cl_bench.data.batching import layout
from cl_bench.data.tasks import Example
from cl_bench.data.tokenization import IGNORE_INDEX, TokenizedText
from cl_bench.errors import ConfigError, check_choice, check_number
from cl_bench.models import decoder
from cl_bench.rng import derive_seed
from cl_bench.training.lm import eval_mode
from methods.base import CLMethod
from methods.shared.general_texts import read_texts, self_generated

BELOW, INSIDE, ABOVE = -1, 0, 1
MODES = ("batch", "interleave", "concat")


def final_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The lm_head input at every position (the decoder's normalised last hidden state), fp32."""
    return decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state.float()


def bands(hidden: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """int8 band of every entry: BELOW (<= lower), ABOVE (>= upper), INSIDE otherwise."""
    out = torch.zeros(hidden.shape, dtype=torch.int8, device=hidden.device)
    out[hidden <= lower] = BELOW
    out[hidden >= upper] = ABOVE
    return out


def margin_loss(
    hidden: torch.Tensor, band: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """TM: the band-crossing terms summed over unmasked entries, divided by how many are non-zero."""
    below = torch.relu(hidden - lower) * (band == BELOW)
    inside = (torch.relu(hidden - upper) + torch.relu(lower - hidden)) * (band == INSIDE)
    above = torch.relu(upper - hidden) * (band == ABOVE)
    terms = (below + inside + above) * mask.unsqueeze(-1)
    return terms.sum() / ((terms != 0).sum() + 1e-8)


class GeRe(CLMethod):
    name = "gere"
    learning_paradigms = ("sft",)
    learning_refusal = (
        "its general texts are language-modelling rows without a prompt to roll out, and its margin loss reads "
        "the hidden states and teacher-forced logits of the step's SFT forward pass"
    )
    supported_strategies = ("single_device", "ddp", "fsdp")
    trains_lora = True  # its penalty is on hidden states, whatever trains

    def __init__(
        self,
        general_data: str | None = None,
        num_samples: int = 64,
        max_length: int = 563,
        generate_tokens: int = 128,
        per_step: int = 1,
        weight: float | str = 100,
        seed: int = 0,
        mode: str = "batch",
    ):
        self.mode = check_choice(mode, MODES, "method.mode")
        self.general_data = general_data
        self.num_samples = check_number(num_samples, "method.num_samples", integer=True, low=1)
        self.max_length = check_number(max_length, "method.max_length", integer=True, low=2)
        self.generate_tokens = check_number(generate_tokens, "method.generate_tokens", integer=True, low=1)
        self.per_step = check_number(per_step, "method.per_step", integer=True, low=1)
        if weight != "dy":
            try:
                weight = float(check_number(weight, "method.weight", low=0))
            except ConfigError:
                raise ConfigError(f"method.weight must be a number >= 0 or 'dy', got {weight!r}") from None
        self.weight = weight
        self.seed = seed
        self.texts: list[list[int]] = []  # token ids of each general text
        self.bands: list[torch.Tensor] = []
        self.lower = self.upper = None
        #: interleave and concat modes: the texts as training rows, each one's token ids -> its index
        self.examples: list[Example] = []
        self.rows: dict[tuple[int, ...], int] = {}
        #: the final hidden state of the last training forward pass (read by a hook on the decoder
        #: while a task trains)
        self.step_hidden: torch.Tensor | None = None
        self.hook = None

    def check_run(self, cfg) -> None:
        super().check_run(cfg)
        world = (
            1
            if self.check_strategy_family(cfg) == "single_device"
            else int(cfg.trainer.get("devices", 1)) * int(cfg.trainer.get("num_nodes", 1))
        )
        #: micro-batches of a step over all processes, and what the planner needs of the extra rows
        self.slots = layout(cfg.train.batch_size, cfg.train.get("micro_batch_size"), world)[2] * world
        self.plan_element = (
            2 if "bf16" in str(cfg.trainer.get("precision")) or cfg.model.get("dtype") == "bfloat16" else 4
        )
        self.plan_lora = cfg.model.get("lora")
        slots = self.slots
        if self.mode == "batch" and self.row_shards and self.per_step % slots:
            raise ConfigError(
                f"method.per_step ({self.per_step}) must be a multiple of the step's micro-batches over "
                f"all processes ({slots}) in mode batch under trainer=fsdp (every process gathers the "
                "layers for the extra rows together), or use method.mode=interleave"
            )
        if self.mode == "interleave" and self.per_step >= cfg.train.batch_size:
            raise ConfigError(
                f"method.per_step ({self.per_step}) must be smaller than train.batch_size "
                f"({cfg.train.batch_size}) in mode interleave: the task needs rows of every batch"
            )

    # --- stream start: the general set and its statistics, from the untrained model ------------------
    def on_stream_start(self, module, stream) -> None:
        start = time.perf_counter()
        model, tokenizer = module.model, module.loaders.tokenizer
        if self.general_data is not None:
            texts = read_texts(self.general_data)[: self.num_samples]
        else:
            texts = self_generated(model, tokenizer, self.num_samples, self.generate_tokens, self.seed)
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"][: self.max_length] for t in texts]
        self.texts = [t for t in ids if len(t) >= 2]
        if not self.texts:
            raise ConfigError("method.general_data: no general text is 2 tokens long or more")
        if self.mode != "batch":  # training rows of exactly these tokens (no BOS or EOS, as the statistics)
            self.examples = [TokenizedText("", tokenizer.decode(t), token_ids=tuple(t)) for t in self.texts]
            self.rows = {tuple(t): i for i, t in enumerate(self.texts)}
        # pass 1: per-dimension moments over every token; pass 2: each entry's band (kept on the host)
        total = square = None
        count = 0
        for h in self.hidden_states(model):
            h = h.double()
            total = h.sum(0) if total is None else total + h.sum(0)
            square = h.square().sum(0) if square is None else square + h.square().sum(0)
            count += h.shape[0]
        mean = total / count
        std = (square / count - mean.square()).clamp(min=0).sqrt()
        self.lower, self.upper = (mean - std).float(), (mean + std).float()
        self.bands = [bands(h, self.lower, self.upper).cpu() for h in self.hidden_states(model)]
        module.log_metrics(
            {
                "gere/general_texts": len(self.texts),
                "gere/general_tokens": count,
                "gere/state_bytes": sum(b.numel() for b in self.bands),
                "gere/setup_s": time.perf_counter() - start,
            }
        )

    def hidden_states(self, model):
        """h* of each general text in turn, one text at a time (no padding), on the model's device."""
        device = next(model.parameters()).device
        with eval_mode(model):
            for t in self.texts:
                with torch.no_grad():
                    ids = torch.tensor([t], device=device)
                    yield final_hidden(model, ids, torch.ones_like(ids))[0]

    def _keep_hidden(self, module, args, output) -> None:
        self.step_hidden = output.last_hidden_state if module.training else None

    def on_train_start(self, trainer, pl_module) -> None:
        self.hook = decoder(pl_module.model).register_forward_hook(self._keep_hidden)

    def on_train_end(self, trainer, pl_module) -> None:
        self.hook.remove()
        self.hook = self.step_hidden = None

    def training_examples(self, task, task_index: int) -> list[Example]:
        return list(task.train) + self.examples  # empty in batch mode

    def replayed_per_batch(self, task, task_index: int) -> int | None:
        return self.per_step if self.mode == "interleave" else None

    # --- every micro-batch: replay and margin --------------------------------------------------
    def text_at(self, k: int) -> int:
        """The k-th general text drawn in the stream: seeded cycles through the set."""
        n = len(self.texts)
        return int(torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(self.seed, k // n)))[k % n])

    def draw(self, step: int, slot: int, slots: int) -> list[int]:
        """Mode batch: the general texts of micro-batch ``slot`` of ``slots`` (processes x
        micro-batches) at stream step ``step``: the step's texts j = slot, slot + slots, ..."""
        return [self.text_at(step * self.per_step + j) for j in range(slot, self.per_step, slots)]

    def general_batch(self, picked: list[int], device) -> dict[str, torch.Tensor]:
        """The texts ``picked``, right-padded (as the authors pad them), with their bands."""
        length = max(len(self.texts[i]) for i in picked)
        ids = torch.zeros(len(picked), length, dtype=torch.long)
        mask = torch.zeros(len(picked), length, dtype=torch.long)
        band = torch.zeros(len(picked), length, self.bands[0].shape[-1], dtype=torch.int8)
        for row, i in enumerate(picked):
            n = len(self.texts[i])
            ids[row, :n], mask[row, :n], band[row, :n] = torch.tensor(self.texts[i]), 1, self.bands[i]
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "bands": band.to(device)}

    def concat_penalty(self, module, batch, task_loss):
        """Concat mode: the general rows of this micro-batch (recognised by their tokens) give
        CE_general and TM from the step's own forward pass; None when it has none."""
        found = [
            (r, self.rows.get(tuple(ids[m.bool()].tolist())))
            for r, (ids, m) in enumerate(zip(batch["input_ids"].cpu(), batch["attention_mask"].cpu()))
        ]
        general = {r: k for r, k in found if k is not None}
        if not general:
            return None
        logits, targets = module.step_logits
        token_ce = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), reduction="none", ignore_index=IGNORE_INDEX
        ).view(targets.shape)
        labelled = targets != IGNORE_INDEX
        is_general = torch.zeros(len(found), dtype=torch.bool, device=targets.device)
        is_general[list(general)] = True

        def mean(rows: torch.Tensor) -> torch.Tensor:
            return token_ce[rows].sum() / labelled[rows].sum().clamp(min=1)

        ce_general = mean(is_general)
        ce = (ce_general + mean(~is_general)) / 2 if len(general) < len(found) else ce_general
        hidden = torch.cat([self.step_hidden[r, -len(self.texts[k]) :] for r, k in general.items()]).float()
        band = torch.cat([self.bands[k] for k in general.values()]).to(hidden.device)
        margin = margin_loss(
            hidden[None],
            band[None],
            self.lower.to(hidden.device),
            self.upper.to(hidden.device),
            torch.ones(1, hidden.shape[0], device=hidden.device),
        )
        return ce_general, ce, margin

    def training_loss(self, module, batch, task_loss):
        """(CE_general + CE_task) / 2 + w TM in place of the task loss (the task loss alone for a
        micro-batch without general rows in interleave and concat modes)."""
        if self.mode != "batch":
            parts = self.concat_penalty(module, batch, task_loss)
            if parts is None:
                return task_loss
            ce_general, ce, margin = parts
            return ce + self.margin_weight(module, ce_general, ce, margin) * margin
        per_process = module.micro_batches_per_step
        slots = module.processes.world_size * per_process
        picked = self.draw(module.stream_step, module.processes.rank * per_process + module.micro_batch_in_step, slots)
        if not picked:  # the step's loss is (CE_general + CE_task) / 2 + w TM: this share of CE_task halved too
            return task_loss / 2
        general = self.general_batch(picked, task_loss.device)
        # the whole model's forward (under FSDP its root gathers the embeddings and the head); the
        # decoder's output, the lm_head input, is read by the hook
        logits = module.model(
            input_ids=general["input_ids"], attention_mask=general["attention_mask"], use_cache=False
        ).logits.float()
        hidden = self.step_hidden.float()
        labels = general["input_ids"][:, 1:].masked_fill(general["attention_mask"][:, 1:] == 0, -100)
        ce_general = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100
        )
        margin = margin_loss(
            hidden,
            general["bands"],
            self.lower.to(hidden.device),
            self.upper.to(hidden.device),
            general["attention_mask"],
        )
        weight = self.margin_weight(module, ce_general, (ce_general + task_loss) / 2, margin)
        # the micro-batches holding texts carry the whole step's general terms (Lightning and DDP
        # average the slots' losses), so the step weighs them the same at any micro-batch size
        share = slots / min(self.per_step, slots)
        return share * (ce_general / 2 + weight * margin) + task_loss / 2

    def margin_weight(self, module, ce_general, ce, margin):
        """w: 100, or dy: ce / TM (no gradient); logs the general terms."""
        weight = ce.detach() / (margin.detach() + 1e-8) if self.weight == "dy" else self.weight
        if module.should_log:
            module.log_metrics(
                {"gere/ce_general": ce_general.item(), "gere/margin": margin.item(), "gere/weight": float(weight)}
            )
        return weight

    def planned_pass(self, model, world):
        """Mode batch: the extra forward of the general texts of one micro-batch, beside the step's
        own activations (the other modes train them as rows of the batch)."""
        if self.mode != "batch":
            return {}
        from cl_bench.memory_plan import activation_bytes

        texts = -(-self.per_step // getattr(self, "slots", 1))
        config = model.get_base_model().config if hasattr(model, "peft_config") else model.config
        return {
            f"general texts' forward ({texts} x {self.max_length} tokens)": activation_bytes(
                config,
                texts,
                self.max_length,
                self.max_length,
                getattr(self, "plan_element", 4),
                getattr(self, "plan_lora", None),
            )
        }

    def planned_host(self, model, world, tasks):
        """The bands live on the host; only a drawn text's go to the GPU, with its batch."""
        config = model.get_base_model().config if hasattr(model, "peft_config") else model.config
        return {"hidden-state bands (int8)": self.num_samples * self.max_length * config.hidden_size}

    def state_dict(self):
        return {"lower": self.lower, "upper": self.upper}  # the draws follow the stream step

    def load_state_dict(self, state_dict) -> None:
        if self.lower is not None and not (
            torch.equal(state_dict["lower"].cpu(), self.lower.cpu())
            and torch.equal(state_dict["upper"].cpu(), self.upper.cpu())
        ):
            raise ConfigError(
                "GeRe's general-sample thresholds, rebuilt from the untrained model, differ from the "
                "checkpoint's: the general texts or the base model changed since the run started"
            )
