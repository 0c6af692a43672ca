"""LwF: Learning without Forgetting (Li & Hoiem 2017, TPAMI), for a causal LM.

While task t > 0 trains, the model as it was after task t-1 (the teacher) gives soft targets on
the new task's own inputs, and the loss adds their distillation at temperature T on the positions
that predict answer tokens:

    L = L_task + lambda * (1/N) sum_{answer positions j} KL( softmax(z_old_j / T) || softmax(z_j / T) )

N is the task loss's token count (the same reduction, so the term is exact under accumulation and
DDP). Li & Hoiem write the term as a cross-entropy with the soft targets, which differs from the KL
by the teacher's entropy, a constant: the same gradient. Their defaults: T = 2, lambda = 1.

Where the teacher's logits come from (``teacher``):
- ``copy``: a frozen copy of the model, one more forward pass per step, one more model in memory.
- ``topk``: before task t the model *is* the teacher; one pass over the task's training examples
  keeps the ``k`` largest logits (and their token ids) at every answer position of every example,
  keyed by the example's tokens. The term then uses the teacher distribution renormalised over
  its top k: sum_{v in topk} p_v (log p_v - log q_v). With k = the vocabulary it equals ``copy``.

``direction: reverse`` uses KL(student || teacher) instead, as TRACE's ``model/Regular/LwF.py``
does (its ``kl_div(log_softmax(old / T), softmax(new / T))``); it needs the whole teacher
distribution (``teacher: copy``).

``reduction`` decides which positions the term covers and how it is scaled:
- ``answer_mean`` (the default): the positions that predict answer tokens, reduced as the task loss.
- ``trace``: TRACE's ``KD_loss``, ``F.kl_div(..., reduction="batchmean")`` over the logits of every
  position of the padded micro-batch (prompt, answer and padding): the sum over all positions
  divided by the micro-batch's sequence count, added to each micro-batch's loss (so under
  accumulation the mean of the micro-batches' terms, as DeepSpeed averages them). It grows with the
  sequence length: on a batch of 4 x 246 positions with 36 answer tokens it is about 250x the
  ``answer_mean`` term. ``experiment=trace`` selects it with ``direction: reverse``
  (conf/method_recipe/trace_lwf.yaml). TRACE keeps the teacher's logits on the host; here the
  teacher is a frozen copy (docs/fidelity.md).
"""

from __future__ import annotations

import copy
import hashlib
import time

import torch

from cl_bench.data.tokenization import IGNORE_INDEX
from cl_bench.errors import ConfigError, check_choice, check_number
from cl_bench.training.lm import eval_mode, labelled_logits, labelled_mean, sequence_and_labelled_logits
from methods.base import CLMethod, tensor_bytes

TEACHERS = ("copy", "topk")
DIRECTIONS = ("forward", "reverse")
CACHE_DTYPES = ("float16", "bfloat16", "float32")
REDUCTIONS = ("answer_mean", "trace")


def example_key(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bytes:
    """An example's identity: a digest of its unpadded tokens (the same whatever the batch)."""
    tokens = input_ids[attention_mask.bool()].to(device="cpu", dtype=torch.int64)
    return hashlib.blake2b(tokens.numpy().tobytes(), digest_size=16).digest()


def distillation(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    direction: str = "forward",
    teacher_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL per position [..] between the tempered teacher and student distributions.

    ``teacher`` holds full logits [.., V], or with ``teacher_ids`` the logits of those token ids
    only [.., k] (the teacher distribution is renormalised over them).
    """
    log_q = torch.log_softmax(student / temperature, dim=-1)
    log_p = torch.log_softmax(teacher / temperature, dim=-1)
    if teacher_ids is not None:
        log_q = log_q.gather(-1, teacher_ids)
    if direction == "forward":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


class LwF(CLMethod):
    name = "lwf"
    learning_paradigms = ("sft",)
    learning_refusal = (
        "its distillation compares teacher and student at the reference answer's teacher-forced positions "
        "(and caches the teacher there per training example), which learning from sampled completions does not have"
    )
    supported_strategies = ("single_device", "ddp", "fsdp")  # fsdp: with teacher=topk (check_run)
    trains_lora = True  # the teacher is a copy of the model, adapters included

    def __init__(
        self,
        lambda_: float = 1.0,
        temperature: float = 2.0,
        teacher: str = "copy",
        top_k: int = 64,
        direction: str = "forward",
        cache_dtype: str = "float16",
        reduction: str = "answer_mean",
    ):
        self.lambda_ = float(check_number(lambda_, "method.lambda_", low=0))
        self.temperature = float(check_number(temperature, "method.temperature", low=0, low_open=True))
        self.teacher_kind = check_choice(teacher, TEACHERS, "method.teacher")
        self.top_k = check_number(top_k, "method.top_k", integer=True, low=1)
        self.direction = check_choice(direction, DIRECTIONS, "method.direction")
        self.cache_dtype = getattr(torch, check_choice(cache_dtype, CACHE_DTYPES, "method.cache_dtype"))
        self.reduction = check_choice(reduction, REDUCTIONS, "method.reduction")
        if self.direction == "reverse" and self.teacher_kind == "topk":
            raise ConfigError("method.direction=reverse needs the whole teacher distribution: set method.teacher=copy")
        if self.reduction == "trace" and self.teacher_kind == "topk":
            raise ConfigError(
                "method.reduction=trace needs the teacher's logits at every position: set method.teacher=copy"
            )
        #: TRACE's term reads the student's logits at every position of the sequence
        self.sequence_logits = self.reduction == "trace"
        self.teacher: torch.nn.Module | None = None
        #: example key -> (top-k logits [answer positions, k], their token ids)
        self.cache: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}

    def check_run(self, cfg) -> None:
        super().check_run(cfg)
        if self.teacher_kind == "copy" and self.row_shards:
            raise ConfigError(
                "method lwf's frozen teacher copy cannot be taken of a sharded model: under "
                "trainer=fsdp use method.teacher=topk (the teacher's top-k logits, cached before the task) "
                "with method.direction=forward and method.reduction=answer_mean (TRACE's term needs the copy)"
            )

    def on_task_start(self, module, task, task_index: int) -> None:
        self.teacher, self.cache = None, {}
        if task_index == 0:
            return
        start = time.perf_counter()
        if self.teacher_kind == "copy":
            self.teacher = copy.deepcopy(module.model).eval().requires_grad_(False)
            state = tensor_bytes(self.teacher.parameters())
        else:
            with module.full_weights():  # FSDP: every process caches every example's logits
                self.cache = self.top_logits(module.model, module.pass_loader(task.train))
            state = tensor_bytes(t for pair in self.cache.values() for t in pair)
        module.log_metrics({"lwf/teacher_bytes": state, "lwf/teacher_s": time.perf_counter() - start})

    @torch.no_grad()
    def top_logits(self, model: torch.nn.Module, batches) -> dict[bytes, tuple[torch.Tensor, torch.Tensor]]:
        """The ``top_k`` logits and token ids at every answer position of every example."""
        cache, device = {}, next(model.parameters()).device
        with eval_mode(model):
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                logits, targets = labelled_logits(model, batch)
                values, ids = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1)
                for b in range(logits.shape[0]):
                    at = targets[b] != IGNORE_INDEX
                    cache[example_key(batch["input_ids"][b], batch["attention_mask"][b])] = (
                        values[b, at].to(self.cache_dtype).cpu(),
                        ids[b, at].to(torch.int32).cpu(),
                    )
        return cache

    def _cached(self, batch: dict[str, torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached teacher logits laid out as ``targets`` ([B, K, k]; zeros off the answer)."""
        k = next(iter(self.cache.values()))[0].shape[-1]
        values = torch.zeros(*targets.shape, k, device=targets.device)
        ids = torch.zeros(*targets.shape, k, dtype=torch.int64, device=targets.device)
        for b in range(targets.shape[0]):
            key = example_key(batch["input_ids"][b], batch["attention_mask"][b])
            if key not in self.cache:
                raise RuntimeError(
                    "LwF's top-k cache has no teacher logits for a training example: the task's "
                    "training data changed after the cache was built (method.teacher=topk)"
                )
            v, i = self.cache[key]
            at = targets[b] != IGNORE_INDEX
            values[b, at], ids[b, at] = v.to(values.device, torch.float32), i.to(ids.device, torch.int64)
        return values, ids

    def penalty(self, module, batch, task_loss):
        if self.teacher is None and not self.cache:
            return None
        logits, targets = module.step_logits
        if self.reduction == "trace":
            with torch.no_grad():
                teacher = sequence_and_labelled_logits(self.teacher, batch)[0].float()
            kl = distillation(module.step_sequence_logits.float(), teacher, self.temperature, self.direction)
            term = self.lambda_ * kl.sum() / kl.shape[0]  # batchmean: every position, per sequence
        elif self.teacher is not None:
            with torch.no_grad():
                teacher, _ = labelled_logits(self.teacher, batch)
            kl = distillation(logits, teacher, self.temperature, self.direction)
        else:
            values, ids = self._cached(batch, targets)
            kl = distillation(logits, values, self.temperature, self.direction, teacher_ids=ids)
        if self.reduction == "answer_mean":
            term = self.lambda_ * labelled_mean(kl, targets, batch)
        if module.should_log:
            module.log_metrics({"lwf/distillation": term.item()})
        return term

    def planned_state(self, model, world, tasks):
        """The frozen copy (``teacher: topk`` keeps a cache that grows with the task's answers instead)."""
        if self.teacher_kind != "copy":
            return {}
        return {"teacher (frozen copy)": tensor_bytes(model.parameters())}

    def on_task_end(self, module, task, task_index: int) -> None:
        self.teacher, self.cache = None, {}
