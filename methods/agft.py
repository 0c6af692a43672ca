"""AGFT: attribution-guided continual fine-tuning (Liu et al. 2026, arXiv 2605.05285).

After task tau, for each of its correctly predicted training samples n (of a seeded sample of
``num_samples``), the relevance of every selected weight for the predicted next-token logits,
from layer-wise relevance propagation (LRP-epsilon):

    f_n     = sum over answer positions j of max_v z_{j,v}            (the predicted logits)
    R^n     = W (.) g~^n        g~^n: the gradient of f_n with the epsilon rule on every nn.Linear
                                (the backward signal at each output z is scaled by z / (z + eps sign z))
    S^n     = log(1 + |R^n| / mean|R^n|)                              (log scale, per tensor)
    I_tau   = mean over the top-K samples of S^n, per entry
    Ibar    = I_tau normalised into [0, 1] (min-max per tensor, or by the global max)
    Rbar   <- max(Rbar, Ibar)                                          (the gate: max over past tasks)

and while task t trains every optimizer update is scaled, theta <- theta_old + (1 - Rbar) (.)
(theta_new - theta_old) (``scale: update``), so an entry important to earlier tasks "receives a
smaller update", as the paper intends, under any optimizer. ``scale: grad``, g <- (1 - Rbar) (.) g,
is the equation taken literally: under Adam it changes only entries with Rbar = 1 (Adam divides
each coordinate by the RMS of the same scaled gradient; docs/fidelity.md).

"Correctly predicted" (``samples``):
- ``correct``: the teacher-forced argmax equals the answer at a share of at least
  ``min_token_accuracy`` of the answer positions (1.0, the default: every one);
- ``scored``: the sample's greedy answer (the task's own ``max_new_tokens``) scores at least
  ``min_score`` (0-100) by the task's own metric, for long answers (summaries, code) that are
  almost never right at every token;
- ``all``: every sample of the seeded sample.
How many samples formed each task's relevance is logged, warned about when none did (the task
then adds nothing to the gate), and kept in results.json's ``method.relevance_samples``. For
a network of linear layers and ReLUs, W (.) g~ is exactly LRP-epsilon's relevance of each weight
(tested against the layer-by-layer rule); through softmax attention, RMSNorm and SwiGLU the other
operations pass the ordinary gradient (gradient x input), not AttnLRP's rules. What the paper
leaves open (the rule, eps, K, the log scale, the normalisation) is set in conf/method/agft.yaml
and listed in docs/fidelity.md.

The gradient is scaled once per optimizer step (``edit_gradients``), the update by the optimizer's
step hooks. Under FSDP (``trainer=fsdp``) every process computes the relevance on the gathered
weights (the same samples everywhere, so the same gate) and keeps the gate as the rows of its own
parameter shards (cl_bench/training/parameter_views.py), which both scalings then read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from cl_bench.data.tokenization import IGNORE_INDEX
from cl_bench.errors import check_choice, check_number
from cl_bench.evaluation.generation import GenerationConfig, generate
from cl_bench.evaluation.metrics import METRICS
from cl_bench.rng import derive_seed
from cl_bench.training.lm import eval_mode, labelled_logits
from cl_bench.training.parameter_views import ParameterViews, place_state, whole_state
from methods.base import CLMethod, model_bytes, trainable_bytes
from methods.shared.importance import overall_mean, sample_examples
from methods.shared.masking import select_parameters

SCALES = ("grad", "update")
NORMALIZATIONS = ("tensor", "global")
SAMPLES = ("correct", "scored", "all")

log = logging.getLogger(__name__)


class _EpsilonRule(torch.autograd.Function):
    """Identity forward; backward scales the signal by z / (z + eps sign(z)) (LRP-epsilon)."""

    @staticmethod
    def forward(ctx, z, eps):
        ctx.save_for_backward(z)
        ctx.eps = eps
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        stabilised = z + ctx.eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
        return grad * (z / stabilised), None


@contextmanager
def epsilon_rule(model: torch.nn.Module, eps: float):
    """Within the block, gradients through ``model`` follow LRP-epsilon at every nn.Linear output."""
    handles = (
        []
        if eps == 0
        else [
            m.register_forward_hook(lambda module, args, out: _EpsilonRule.apply(out, eps))
            for m in model.modules()
            if isinstance(m, torch.nn.Linear)
        ]
    )
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def weight_relevance(output: torch.Tensor, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """W (.) d output / d W for each parameter (under :func:`epsilon_rule`: LRP-epsilon relevance)."""
    grads = torch.autograd.grad(output, list(params.values()), allow_unused=True)
    return {
        n: torch.zeros_like(p) if g is None else (p.detach() * g).float() for (n, p), g in zip(params.items(), grads)
    }


class TopKMean:
    """Per entry, the mean of the K largest values seen (of fewer, while fewer were seen)."""

    def __init__(self, shapes: dict[str, torch.Size], k: int, device):
        self.k, self.count = k, 0
        self.values = {n: torch.empty(k, *s, device=device) for n, s in shapes.items()}

    def add(self, scores: dict[str, torch.Tensor]) -> None:
        for n, s in scores.items():
            buf = self.values[n]
            if self.count < self.k:
                buf[self.count] = s
            else:
                low, where = buf.min(0)
                buf.scatter_(0, where.unsqueeze(0), torch.maximum(s, low).unsqueeze(0))
        self.count += 1

    def mean(self) -> dict[str, torch.Tensor]:
        used = min(self.count, self.k)
        return {n: v[:used].mean(0) for n, v in self.values.items()}


def normalise(scores: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    """Into [0, 1]: min-max per tensor, or divided by the largest entry of all (scores are >= 0)."""
    if how == "global":
        top = max(s.max() for s in scores.values()).clamp(min=1e-30)
        return {n: s / top for n, s in scores.items()}
    return {n: (s - s.min()) / (s.max() - s.min()).clamp(min=1e-30) for n, s in scores.items()}


class AGFT(CLMethod):
    name = "agft"
    supported_strategies = ("single_device", "ddp", "fsdp")
    trains_lora = True  # gates the trainable weights: the adapters under LoRA

    def __init__(
        self,
        num_samples: int = 32,
        top_k: int = 5,
        epsilon: float = 1e-6,
        normalize: str = "tensor",
        scale: str = "update",
        samples: str = "correct",
        min_token_accuracy: float = 1.0,
        min_score: float = 50.0,
        param_patterns: Sequence[str] | None = ("*layers.*",),
        seed: int = 0,
    ):
        self.num_samples = check_number(num_samples, "method.num_samples", integer=True, low=1)
        self.top_k = check_number(top_k, "method.top_k", integer=True, low=1)
        self.epsilon = float(check_number(epsilon, "method.epsilon", low=0))
        self.normalize = check_choice(normalize, NORMALIZATIONS, "method.normalize")
        self.scale = check_choice(scale, SCALES, "method.scale")
        self.samples = check_choice(samples, SAMPLES, "method.samples")
        self.min_token_accuracy = float(check_number(min_token_accuracy, "method.min_token_accuracy", low=0, high=1))
        self.min_score = float(check_number(min_score, "method.min_score", low=0, high=100))
        #: per finished task, how many samples formed its relevance (results.json's method section)
        self.relevance_samples: dict[str, int] = {}
        self.param_patterns = None if param_patterns is None else list(param_patterns)
        self.seed = seed
        #: Rbar: the element-wise max of the normalised relevance of every finished task, placed as
        #: the parameter views are (this process's rows under FSDP)
        self.gate: dict[str, torch.Tensor] = {}
        self.model: torch.nn.Module | None = None
        self.handles: list = []
        self.before_step: dict[str, torch.Tensor] = {}

    def on_stream_start(self, module, stream) -> None:
        self.model = module.model
        select_parameters(module.model, self.param_patterns, "method.param_patterns")

    # --- after a task: the relevance of its correctly predicted samples ---------------------------
    def relevance(self, module, examples, params: dict[str, torch.nn.Parameter]) -> tuple[dict[str, torch.Tensor], int]:
        """I_tau of ``params`` (top-K mean of the log-scaled relevance over the correctly predicted
        samples, or over all with ``samples: all``) and how many samples it used."""
        model = module.model
        device = next(model.parameters()).device
        top = TopKMean({n: p.shape for n, p in params.items()}, self.top_k, device)
        with eval_mode(model), epsilon_rule(model, self.epsilon):
            for batch in module.pass_loader(examples):
                for b in range(batch["input_ids"].shape[0]):
                    one = {k: v[b : b + 1].to(device) for k, v in batch.items()}
                    logits, targets = labelled_logits(model, one)
                    answer = targets != IGNORE_INDEX
                    if self.samples == "correct" and not self.predicted(logits, targets):
                        continue
                    relevance = weight_relevance(logits.max(-1).values[answer].sum(), params)
                    for r in relevance.values():  # log1p(|R| / mean |R|), in place
                        r.abs_()
                        r.div_(r.mean().clamp(min=1e-30)).log1p_()
                    top.add(relevance)
        return top.mean() if top.count else {
            n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()
        }, top.count

    def predicted(self, logits: torch.Tensor, targets: torch.Tensor) -> bool:
        """``samples: correct``: the argmax is right at >= ``min_token_accuracy`` of the answer positions."""
        right = (logits.argmax(-1) == targets)[targets != IGNORE_INDEX]
        return (
            bool(right.all())
            if self.min_token_accuracy == 1
            else right.float().mean().item() >= self.min_token_accuracy
        )

    def well_answered(self, module, task, examples: list) -> list:
        """``samples: scored``: the examples whose greedy answer scores >= ``min_score`` (its own metric)."""
        score = METRICS[task.metric]
        answers = generate(
            module.model,
            module.loaders.tokenizer,
            examples,
            task.spec.max_new_tokens,
            GenerationConfig(
                batch_size=module.loaders.micro_batch_size or module.loaders.batch_size,
                max_prompt_len=module.loaders.max_prompt_len,
            ),
        )
        return [ex for ex, a in zip(examples, answers) if score([a], [ex.answer], [ex.prompt]) >= self.min_score]

    def on_task_end(self, module, task, task_index: int) -> None:
        start = time.perf_counter()
        examples = sample_examples(task.train, self.num_samples, derive_seed(self.seed, task_index))
        with module.full_weights():  # FSDP: every process attributes with the gathered weights
            if self.samples == "scored":
                examples = self.well_answered(module, task, examples)
            params = select_parameters(module.model, self.param_patterns, "method.param_patterns")
            scores, correct = self.relevance(module, examples, params)
        self.relevance_samples[task.name] = correct
        if not correct:
            log.warning(
                "AGFT: none of the %d samples examined of task %s passed method.samples=%s, so the task adds "
                "nothing to the gate; on long answers set method.samples=scored (the task's metric >= "
                "method.min_score) or method.min_token_accuracy below 1",
                len(examples),
                task.name,
                self.samples,
            )
        scores = place_state(normalise(scores, self.normalize) if correct else scores, module.model)
        gate = place_state(self.gate, module.model)
        self.gate = scores if not gate else {n: torch.maximum(gate[n], s) for n, s in scores.items()}
        module.log_metrics(
            {
                "agft/correct_samples": correct,
                "agft/attribution_s": time.perf_counter() - start,
                # the mean over the whole gate, not this shard's rows
                "agft/gate_mean": overall_mean(self.gate, ParameterViews(module.model)),
            }
        )

    # --- during a task: the gate scales gradients or updates ------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self.gate = place_state(self.gate, pl_module.model)  # the model is on its device, sharded under FSDP
        if not self.gate or self.scale != "update":
            return
        views = ParameterViews(pl_module.model)
        for opt in trainer.optimizers:
            self.handles.append(opt.register_step_pre_hook(lambda *_: self._remember(views)))
            self.handles.append(opt.register_step_post_hook(lambda *_: self._scale_updates(views)))

    @torch.no_grad()
    def edit_gradients(self, module, views) -> None:
        """``scale: grad``: g <- (1 - Rbar) (.) g."""
        if self.gate and self.scale == "grad":
            for n, (_, grad) in views.gradients(self.gate).items():
                grad.mul_(1 - self.gate[n].to(grad.dtype))

    @torch.no_grad()
    def _remember(self, views: ParameterViews) -> None:
        self.before_step = {n: views.weight(p).clone() for n, p in views.parameters(self.gate).items()}

    @torch.no_grad()
    def _scale_updates(self, views: ParameterViews) -> None:
        """theta <- theta + Rbar (.) (theta_old - theta) = theta_old + (1 - Rbar) (.) delta, in place."""
        for n, p in views.parameters(self.gate).items():
            weights = views.weight(p)
            weights.addcmul_(self.gate[n].to(weights.dtype), self.before_step[n].sub_(weights))
        self.before_step = {}

    def on_train_end(self, trainer, pl_module) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def planned_state(self, model, world, tasks):
        """The gate (fp32) and, scaling updates, theta_old during each step; under FSDP each shard's rows."""
        share = world if self.row_shards else 1
        items = {"gate (fp32)": trainable_bytes(model, 4) // share}
        return (
            {**items, "weights before the step (copy)": trainable_bytes(model) // share}
            if self.scale == "update"
            else items
        )

    def planned_pass(self, model, world):
        """The relevance pass at a task's end: the top-K buffers and one sample's relevance (fp32,
        whole), under FSDP with every layer gathered."""
        items = {f"relevance pass: top-{self.top_k} + 1 (fp32)": (self.top_k + 1) * trainable_bytes(model, 4)}
        if self.row_shards:
            items["relevance pass: gathered weights"] = model_bytes(model)
        return items

    def report(self):
        return {"relevance_samples": dict(self.relevance_samples)}

    def state_dict(self):
        """The whole gate (under FSDP gathered from every process's rows: every process calls this)."""
        return {
            "gate": {n: g.cpu() for n, g in whole_state(self.gate, self.model).items()},
            "relevance_samples": dict(self.relevance_samples),
        }

    def load_state_dict(self, state_dict) -> None:
        """Restore the whole gate; it is placed at the next fit's start."""
        self.relevance_samples = dict(state_dict.get("relevance_samples", {}))
        self.gate = dict(state_dict["gate"])
