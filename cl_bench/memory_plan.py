"""Memory per GPU of a run config, before anything runs (``python -m runners.plan``).

The model is built from its architecture on PyTorch's meta device, so no weight is read and no
memory is taken: N parameters (tied embeddings once), T of them trainable (the adapters under
``model.lora``), U the largest decoder layer. w is the bytes of each weight's dtype (``model.dtype``;
peft keeps adapters in fp32 on a bf16 base), D the processes (``trainer.devices`` x
``trainer.num_nodes``). Per GPU, for AdamW (2 moments per trainable weight):

    strategy         weights                gradients          optimizer
    single device    N w                    T w                2 T w
    DDP              N w                    T w + T w buckets  2 T w
    FSDP FULL_SHARD  N w / D + 2 U w16      T w / D            2 T w / D
    DeepSpeed ZeRO-2 N w16 (bf16 module)    T w16 / D          (4 + 8) T / D (fp32 master + moments)

w16 is 2 under bf16 precision (or weights), else 4. DDP keeps its gradient buckets beside the gradients
(Lightning does not set ``gradient_as_bucket_view``). FSDP gathers one layer at a time and
prefetches the next (2 U). The method's own state comes from the method
(:meth:`cl_bench.training.method.CLMethod.planned_state`), and so do the buffers of its own pass at a task's
start or end (:meth:`~cl_bench.training.method.CLMethod.planned_pass`: a Fisher, scores, an attribution, under
FSDP through the sharded model or on the gathered weights where a method needs them whole; GeRe's
extra forward of general texts in its batch mode), which the peak adds to the activations. The
passes run under the run's autocast (``CLModule.precision_context``), so their activations are
those of the training step, at the same e bytes. What a method keeps on the host
(:meth:`~cl_bench.training.method.CLMethod.planned_host`, e.g. GeRe's bands) is listed apart, not in the peak.
Under FSDP evaluation gathers the whole model (N w) on
every process, a peak of its own while no activations are kept; the generation's KV cache is not
estimated. Activations are an estimate for a Llama-type
decoder without activation checkpointing, per micro-batch of m sequences of s = max_prompt_len +
max_ans_len tokens: every layer keeps about (7 h + 3 h_kv + 4 i) values per token for the
backward pass (norm inputs, q/k/v before and after RoPE, attention output, the MLP's gate, up,
SiLU and product), at e bytes (2 under bf16 autocast, else 4); the LM head keeps (e + 8) bytes per
vocabulary entry of every answer token (logits, fp32 log-softmax).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from cl_bench.distributed import strategy_family
from cl_bench.errors import ConfigError
from cl_bench.training.learning import SFT
from cl_bench.training.method import tensor_bytes

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GIB = 1024**3


def architecture(model_node: DictConfig):
    """The transformers config of the ``model`` node, without weights: a local folder's config.json,
    one shipped in ``cl_bench/architectures`` (named by hub id), or the hub's."""
    from transformers import AutoConfig

    from cl_bench.models import ARCHITECTURES, random_architecture_config, shipped_architecture

    target = str(model_node.get("_target_", ""))
    if target.endswith("random_architecture"):
        return random_architecture_config(model_node.name, model_node.get("num_layers"))
    if target.endswith("tiny_llama"):
        from cl_bench.config import build, without

        return build(without(model_node, "lora")).model.config  # a few kB: built for real
    name = SMOLLM2_HUB_ID if target.endswith("load_smollm2") else model_node.get("name_or_path")
    if name is None:
        raise ConfigError(
            f"model._target_ {target}: the planner reads architectures of load_pretrained, "
            "load_smollm2 and tiny_llama models only"
        )
    if Path(name).is_dir():
        return AutoConfig.from_pretrained(name)
    shipped = shipped_architecture(name)
    if shipped is not None:
        return shipped
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"model.name_or_path={name}: no local folder, no shipped architecture in {ARCHITECTURES}, "
            f"and the hub did not give one ({e.__class__.__name__}); add its config.json there"
        ) from None


def meta_model(model_node: DictConfig) -> torch.nn.Module:
    """The model of ``model_node`` (LoRA adapters included) with every tensor on the meta device."""
    from transformers import AutoModelForCausalLM

    from cl_bench.models import add_lora

    config = architecture(model_node)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, model_node.get("dtype") or "float32"))
    lora = model_node.get("lora")
    if lora is not None and lora.get("enabled", False):
        model = add_lora(model, lora)
    return model


def _bytes(dtype_name: str | None) -> int:
    return torch.empty((), dtype=getattr(torch, dtype_name or "float32"), device="meta").element_size()


@dataclass
class MemoryPlan:
    """Bytes per GPU by item, with what they were computed from."""

    model: str
    strategy: str
    processes: int
    params: int
    trainable: int
    micro_batch: int
    seq_len: int
    items: dict[str, int] = field(default_factory=dict)
    #: the method's own state, by what it is
    method_items: dict[str, int] = field(default_factory=dict)
    #: held only during the method's own pass at a task's start or end (Fisher, scores, attribution)
    pass_items: dict[str, int] = field(default_factory=dict)
    activations: int = 0
    #: kept in host memory, not on the GPU (listed, not in the peak)
    host_items: dict[str, int] = field(default_factory=dict)
    #: FSDP: the whole model gathered on every process while a stage is evaluated
    evaluation: int = 0
    #: eval.engine=vllm: the share of the GPU's memory its engine reserves while it evaluates
    #: (eval.vllm.memory_fraction; asleep during training)
    engine_fraction: float = 0.0
    refusal: str | None = None

    @property
    def states(self) -> int:
        """Weights, gradients, optimizer and method state: what the planner counts exactly."""
        return sum(self.items.values()) + sum(self.method_items.values())

    @property
    def total(self) -> int:
        """The peak: the states, plus the larger of training (the activations of a step, or of the
        batch a method's pass runs on, and the pass's own buffers) and, under FSDP, evaluation (the
        whole model gathered). The previous task's optimizer is counted as alive throughout."""
        return self.states + max(self.activations + sum(self.pass_items.values()), self.evaluation)

    def peak(self, gpu_gib: float | None = None) -> int:
        """:attr:`total`, with the vLLM engine's reservation of a ``gpu_gib`` GPU added to the
        evaluation's side (the engine sleeps while training runs)."""
        if not self.engine_fraction or gpu_gib is None:
            return self.total
        engine = int(self.engine_fraction * gpu_gib * GIB)
        return self.states + max(self.activations + sum(self.pass_items.values()), self.evaluation + engine)

    def fits(self, gpu_gib: float) -> bool:
        return self.peak(gpu_gib) <= gpu_gib * GIB


def _label(model_node: DictConfig) -> str:
    target = str(model_node.get("_target_", ""))
    name = (
        SMOLLM2_HUB_ID
        if target.endswith("load_smollm2")
        else model_node.get("name_or_path") or target.rsplit(".", 1)[-1]
    )
    lora = model_node.get("lora")
    return f"{name}+lora(r={lora.r})" if lora is not None and lora.get("enabled", False) else name


def _largest_layer(model: torch.nn.Module) -> int:
    """Parameters of the largest decoder layer (FSDP's wrapping unit)."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not layers:
        return sum(p.numel() for p in model.parameters())
    return max(sum(p.numel() for p in layer.parameters()) for layer in max(layers, key=len))


def activation_bytes(config, micro_batch: int, seq_len: int, answer_len: int, element: int, lora) -> int:
    """The estimate of the module docstring (plus LoRA dropout's kept inputs)."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) * (h // heads)
    per_token = layers * (7 * h + 3 * kv + 4 * i) * element + 2 * h * element
    if lora is not None and lora.get("enabled", False) and lora.dropout > 0:
        per_token += layers * len(lora.target_modules) * h * (element + 1)
    return micro_batch * (seq_len * per_token + answer_len * config.vocab_size * (element + 8))


def plan(cfg: DictConfig) -> MemoryPlan:
    """The memory plan of a composed run config (``runners.plan`` composes it like a run); its
    settings are checked as a run's are (``train.batch_size=0`` is refused, naming the key)."""
    from cl_bench.config import build
    from cl_bench.run_config import validate_run_config

    validate_run_config(cfg, paths=False)
    model = meta_model(cfg.model)
    params = {id(p): p for p in model.parameters()}.values()
    n = sum(p.numel() for p in params)
    t = sum(p.numel() for p in params if p.requires_grad)
    # in their own dtypes: peft keeps adapters in fp32 on a bf16 base
    n_bytes = tensor_bytes(params)
    t_bytes = tensor_bytes(p for p in params if p.requires_grad)
    trainer = cfg.trainer
    family = strategy_family(trainer.get("strategy", "auto"), trainer.get("devices", 1))
    world = int(trainer.get("devices", 1) or 1) * int(trainer.get("num_nodes", 1) or 1)
    if family == "single_device":
        world = 1
    bf16 = "bf16" in str(trainer.get("precision", "32-true")) or cfg.model.get("dtype") == "bfloat16"
    w16 = 2 if bf16 else _bytes(cfg.model.get("dtype"))
    moments = 2 if "adam" in str(cfg.optimizer.get("_target_", "")).lower() else 0
    items: dict[str, int]
    if family == "fsdp":
        items = {
            "weights (shard)": n_bytes // world,
            "gathered layers (2 U)": 2 * _largest_layer(model) * w16,
            "gradients (shard)": t_bytes // world,
            "optimizer (shard)": moments * t_bytes // world,
        }
    elif family == "deepspeed":
        items = {
            "weights": n * w16,
            "gradients (shard)": t * w16 // world,
            "optimizer: fp32 master + moments (shard)": (4 * (w16 != 4) + 4 * moments) * t // world,
        }
    else:
        items = {"weights": n_bytes, "gradients": t_bytes, "optimizer": moments * t_bytes}
        if family == "ddp":
            items["DDP gradient buckets"] = t_bytes
    micro = cfg.train.get("micro_batch_size") or max(1, cfg.train.batch_size // world)
    seq = cfg.train.max_prompt_len + cfg.train.max_ans_len
    learning = build(cfg.learning) if cfg.get("learning") else SFT()
    # GRPO and self-SFT: a pass over G completions of every prompt of the micro-batch
    rows = micro * getattr(learning, "num_generations", 1)
    lora = (cfg.model.get("lora") or {}).get("enabled", False)
    if (getattr(learning, "needs_reference", False) or cfg.eval.get("kl_to_base", False)) and not lora:
        items["base model (frozen copy, for the KL to it)"] = n_bytes
    config = model.get_base_model().config if hasattr(model, "peft_config") else model.config
    result = MemoryPlan(
        model=_label(cfg.model),
        strategy=family,
        processes=world,
        params=n,
        trainable=t,
        micro_batch=micro,
        seq_len=seq,
        items=items,
        activations=activation_bytes(config, rows, seq, cfg.train.max_ans_len, 2 if bf16 else 4, cfg.model.get("lora")),
        evaluation=n_bytes if family == "fsdp" else 0,
        engine_fraction=float(cfg.eval.vllm.memory_fraction) if cfg.eval.get("engine", "hf") == "vllm" else 0.0,
    )
    method = build(cfg.method)
    try:
        method.check_run(cfg)
        learning.check_run(cfg, method)
    except ConfigError as e:
        result.refusal = str(e)
    tasks = len(cfg.tasks.get("order") or []) or 1
    result.method_items = method.planned_state(model, world, tasks)
    result.pass_items = method.planned_pass(model, world)
    result.host_items = method.planned_host(model, world, tasks)
    return result


#: common GPU memory sizes (GiB) a plan without --gpu-gib is judged against
GPU_SIZES = {24: "RTX 4090, A10", 40: "A100 40GB", 48: "A6000, L40S", 80: "A100 80GB, H100", 141: "H200"}


def verdict(p: MemoryPlan, gpu_gib: float | None) -> str:
    """Whether the plan fits ``gpu_gib``, or which common GPU sizes it fits without one."""
    if gpu_gib is not None:
        spare = (gpu_gib * GIB - p.peak(gpu_gib)) / GIB
        return (
            f"fits in {gpu_gib:g} GiB ({spare:.2f} GiB to spare)"
            if spare >= 0
            else f"does NOT fit in {gpu_gib:g} GiB ({-spare:.2f} GiB short)"
        )
    fits = [f"{g} GiB ({names})" for g, names in GPU_SIZES.items() if p.fits(g)]
    short = [str(g) for g in GPU_SIZES if not p.fits(g)]
    return (
        f"needs {p.total / GIB:.2f} GiB per GPU"
        + (f" and {p.engine_fraction:.0%} of it for the vLLM engine" if p.engine_fraction else "")
        + ": "
        + (f"fits {', '.join(fits)}" if fits else "fits none of the common GPUs")
        + (f"; too large for {', '.join(short)} GiB" if short else "")
        + " (--gpu-gib N checks another size)"
    )


def render(p: MemoryPlan, gpu_gib: float | None) -> str:
    """The plan as a text table (GiB per GPU) and its verdict."""
    lines = [
        f"model {p.model}: {p.params / 1e6:,.1f} M parameters, {p.trainable / 1e6:,.2f} M trainable; "
        f"{p.strategy} over {p.processes} process(es); micro-batch {p.micro_batch} x {p.seq_len} tokens",
        f"{'per GPU':<52}{'GiB':>9}{'MiB':>11}",
    ]
    rows = [
        *p.items.items(),
        *((f"method: {k}", v) for k, v in p.method_items.items()),
        ("activations (estimate)", p.activations),
        *((f"method: {k}", v) for k, v in p.pass_items.items()),
        *([("evaluation: gathered weights", p.evaluation)] if p.evaluation else []),
        *(
            [(f"evaluation: vLLM engine ({p.engine_fraction:.0%} of the GPU)", int(p.engine_fraction * gpu_gib * GIB))]
            if p.engine_fraction and gpu_gib is not None
            else []
        ),
        ("total (peak)", p.peak(gpu_gib)),
    ]
    rows += [(f"host, not GPU: {k}", v) for k, v in p.host_items.items()]
    lines += [f"{name:<52}{value / GIB:>9.2f}{value / 2**20:>11.1f}" for name, value in rows]
    lines.append(verdict(p, gpu_gib))
    if p.engine_fraction and gpu_gib is None:
        lines.append(
            f"note: the vLLM engine reserves {p.engine_fraction:.0%} of the GPU while it evaluates "
            "(eval.vllm.memory_fraction), counted in each size's verdict"
        )
    if p.refusal:
        lines.append(f"note: this run would be refused at start: {p.refusal}")
    return "\n".join(lines)


def as_dict(p: MemoryPlan) -> dict[str, Any]:
    return {**{k: v for k, v in p.__dict__.items()}, "states": p.states, "total": p.total}


def _resident() -> int:
    """This process's resident memory in bytes (Linux), after the garbage collector and glibc have
    given back what is free (else freed temporaries, e.g. of a Fisher pass, would count)."""
    import ctypes
    import gc
    import os

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(cfg: DictConfig) -> dict[str, int]:
    """The plan's exact items, measured on this machine's CPU with the real model: resident memory
    added by loading it (weights), by one training step of the first task with the configured
    optimizer (gradients and optimizer state; the activations are freed again), and by the method's
    task end (its state after the first task). For small models: everything is loaded for real."""
    from cl_bench.config import build, optimizer_factory
    from cl_bench.data.loaders import TaskLoaders
    from cl_bench.models import build_model
    from cl_bench.run_config import build_stream
    from cl_bench.training.lm import causal_lm_loss
    from cl_bench.training.module import CLModule

    stream = build_stream(cfg.tasks)
    method = build(cfg.method)
    base = _resident()
    bundle = build_model(cfg.model)
    for p in bundle.model.parameters():  # touch every page (safetensors maps the file lazily)
        p.data.sum()
    measured = {"weights": _resident() - base}
    loaders = TaskLoaders.from_config(cfg.train, bundle.tokenizer)
    module = CLModule(bundle.model, method, optimizer_factory(cfg.optimizer)[0], loaders=loaders)
    task = stream.tasks[0]
    before = _resident()
    method.on_stream_start(module, stream)
    at_start = _resident() - before  # e.g. a merging method's copy of the pretrained weights
    method.on_task_start(module, task, 0)
    optimizer = module.configure_optimizers()
    causal_lm_loss(bundle.model, next(iter(loaders.passes(task.train)))).backward()
    optimizer.step()
    measured["gradients + optimizer"] = _resident() - base - measured["weights"] - at_start
    method.on_task_end(module, task, 0)
    module.merge_after_task(task, 0)  # a merging method's merge and its running state
    measured["method state"] = _resident() - base - sum(measured.values())
    return measured
