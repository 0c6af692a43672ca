"""A-GEM: averaged gradient episodic memory (Chaudhry et al. 2019, ICLR).

After each task, ``per_task`` seeded training examples of it join an episodic memory. At every
optimizer step of a later task, a reference gradient g_ref of the task loss on a batch of
``memory_batch_size`` examples drawn from the memory is computed at the current weights; if the
step's gradient g conflicts with it, g is projected onto the half-space where it does not:

    if g . g_ref < 0:   g <- g - (g . g_ref / g_ref . g_ref) g_ref

over all trainable parameters at once (one dot product over the whole model).

The edit runs at the optimizer step (``edit_gradients``): g is then the whole step's gradient,
accumulated over micro-batches and reduced over processes, before clipping. g_ref is computed the
same way: the memory batch is laid out over processes and micro-batches as a training batch is
(cl_bench/data/batching.py, the same token-mean normaliser), its micro-batch gradients accumulated
by an ordinary backward (the step's gradient set aside meanwhile) and averaged over processes, so
both vectors and the projection are those of one process. Under FSDP (``trainer=fsdp``) that
backward reduce-scatters g_ref into each process's rows, the dot products are summed over the
processes' rows, and each process projects its own rows. The memory batch of a step is drawn from
the seed and the stream step alone: a resumed run draws the same ones. The memory holds examples
(checkpointed), not tensors.
"""

from __future__ import annotations

import dataclasses

import torch

from cl_bench.data.batching import layout
from cl_bench.data.tasks import Example
from cl_bench.errors import ConfigError, check_number
from cl_bench.rng import derive_seed
from cl_bench.training.lm import causal_lm_loss
from cl_bench.training.parameter_views import ParameterViews
from methods.base import CLMethod, trainable_bytes
from methods.shared.importance import sample_examples


def dot_product(a: list[torch.Tensor], b: list[torch.Tensor], total=lambda value: value.item()) -> float:
    """The dot product of two gradients given as lists of tensors: per-tensor dot products in the
    gradients' dtype (fp32 accumulation), summed in float64, added up over processes by ``total``
    (``ParameterViews.total``, for row shards)."""
    return total(torch.stack([torch.dot(x.flatten(), y.flatten()) for x, y in zip(a, b)]).double().sum())


def project(
    grads: list[torch.Tensor], reference: list[torch.Tensor], total=lambda value: value.item()
) -> tuple[float, bool]:
    """A-GEM's projection of ``grads`` against ``reference``, in place; returns (g . g_ref, projected).
    ``total`` adds a sum over entries up over processes (``ParameterViews.total``, for row shards)."""
    dot = dot_product(grads, reference, total)
    if dot >= 0:  # every process sees the same sum, so all take the same branch
        return dot, False
    norm = dot_product(reference, reference, total)
    if norm == 0:
        return dot, False
    for g, r in zip(grads, reference):
        g.sub_(r.to(g.dtype), alpha=dot / norm)
    return dot, True


class AGEM(CLMethod):
    name = "agem"
    supported_strategies = ("single_device", "ddp", "fsdp")
    trains_lora = True  # projects the gradient of the trainable weights: the adapters under LoRA

    def __init__(self, per_task: int = 100, memory_batch_size: int | None = None, seed: int = 0):
        self.per_task = check_number(per_task, "method.per_task", integer=True, low=1)
        self.memory_batch_size = check_number(
            memory_batch_size, "method.memory_batch_size", integer=True, low=1, allow_none=True
        )
        self.seed = seed
        #: the kept examples of each finished task
        self.memory: list[list[Example]] = []
        self.loaders = None
        self.projected_steps = self.steps = 0

    def on_stream_start(self, module, stream) -> None:
        loaders = module.loaders
        size = self.memory_batch_size or loaders.batch_size
        try:
            layout(size, loaders.micro_batch_size, module.processes.world_size)
        except ConfigError as e:
            raise ConfigError(
                f"method.memory_batch_size ({size}) must be laid out like a training batch: {e}"
            ) from None
        # the memory batch in micro-batches and shares as a training batch; drawn already shuffled,
        # and tokenized anew (a few examples; a cache entry per drawn batch would fill the disk)
        self.loaders = dataclasses.replace(loaders, batch_size=size, shuffle=False, drop_last=False, cache_dir=None)

    def on_task_start(self, module, task, task_index: int) -> None:
        self.projected_steps = self.steps = 0

    def memory_batches(self, module, pool: list[Example] | None = None, seed: int | None = None) -> list[dict]:
        """This step's memory batch, this process's micro-batches of it (a memory smaller than a
        batch is used whole): drawn from ``pool`` (default: the whole memory) with ``seed``
        (default: the method's seed and the stream step)."""
        pool = [ex for kept in self.memory for ex in kept] if pool is None else pool
        seed = derive_seed(self.seed, module.stream_step) if seed is None else seed
        examples = sample_examples(pool, self.loaders.batch_size, seed)
        processes = module.processes
        return list(self.loaders.training(examples, seed=0, rank=processes.rank, world_size=processes.world_size))

    def reference_gradient(
        self, module, views: ParameterViews, params: list[torch.nn.Parameter], micro: list[dict] | None = None
    ) -> list[torch.Tensor]:
        """The task-loss gradient on this step's memory batch (or on the micro-batches ``micro``), as
        one process would compute it, as the views of ``params`` hold it: a backward of each
        micro-batch into emptied ``.grad`` (the step's gradient put back after, on every trainable
        parameter), averaged over processes."""
        trainable = list(views.parameters().values())
        step = [p.grad for p in trainable]
        for p in trainable:
            p.grad = None
        try:
            micro = self.memory_batches(module) if micro is None else micro
            device = views.weight(params[0]).device
            for batch in micro:
                (causal_lm_loss(module.model, {k: v.to(device) for k, v in batch.items()}) / len(micro)).backward()
            reference = [torch.zeros_like(views.weight(p)) if p.grad is None else views.grad(p) for p in params]
        finally:
            for p, g in zip(trainable, step):
                p.grad = g
        views.average_replicas(reference)
        return reference

    def edit_gradients(self, module, views) -> None:
        if not self.memory:
            return
        params = [p for p in views.parameters().values() if p.grad is not None]
        with module.precision_context():  # g_ref at the precision of g (Lightning autocasts only the step)
            reference = self.reference_gradient(module, views, params)
        dot, projected = project([views.grad(p) for p in params], reference, views.total)
        self.steps += 1
        self.projected_steps += projected
        if module.should_log:
            module.log_metrics(
                {
                    "agem/dot": dot,
                    "agem/projected_fraction": self.projected_steps / self.steps,
                    "agem/memory_size": sum(len(kept) for kept in self.memory),
                }
            )

    def on_task_end(self, module, task, task_index: int) -> None:
        self.memory.append(sample_examples(task.train, self.per_task, derive_seed(self.seed, task_index)))

    def planned_state(self, model, world, tasks):
        if self.row_shards:
            return {"reference gradient (shard)": trainable_bytes(model) // world}
        return {"reference gradient + a micro-batch's": 2 * trainable_bytes(model)}

    def state_dict(self):
        return {"memory": [[dataclasses.asdict(e) for e in kept] for kept in self.memory]}

    def load_state_dict(self, state_dict) -> None:
        self.memory = [[Example(**e) for e in kept] for kept in state_dict["memory"]]
