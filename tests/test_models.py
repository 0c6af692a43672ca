import pytest
import torch

from cl_bench.errors import ConfigError
from cl_bench.models import byte_tokenizer, prepare_tokenizer, tiny_llama


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "Grüße, 世界! def f(x):\n    return x"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.padding_side == "left" and tok.pad_token_id not in (tok.bos_token_id, tok.eos_token_id)


def test_tiny_llama_is_seeded_and_sized():
    a, b, c = tiny_llama(seed=1).model, tiny_llama(seed=1).model, tiny_llama(seed=2).model
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert a.config.num_hidden_layers == 2 and a.config.hidden_size == 64
    with pytest.raises(ConfigError, match="model.vocab_size must be >= 259"):
        tiny_llama(vocab_size=100)


def test_prepare_tokenizer_uses_eos_as_pad_when_missing():
    tok = byte_tokenizer()
    tok.pad_token = None
    tok.padding_side = "right"
    prepare_tokenizer(tok)
    assert tok.pad_token == tok.eos_token and tok.padding_side == "left"


def test_a_random_architecture_is_the_shipped_config_with_random_weights_as_the_planner_counts_it():
    """model=random: SmolLM2's shipped architecture, 2 layers deep, with random weights; its
    parameters are those the memory planner counts for the same node, and it runs on the byte
    tokenizer's ids. An architecture not shipped is refused by name."""
    from omegaconf import OmegaConf

    from cl_bench.errors import ConfigError
    from cl_bench.memory_plan import meta_model
    from cl_bench.models import build_model

    node = OmegaConf.create(
        {
            "_target_": "cl_bench.models.random_architecture",
            "name": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "num_layers": 2,
            "seed": 3,
            "dtype": "float32",
            "init_device": "cpu",
        }
    )
    bundle = build_model(node)
    assert bundle.model.config.num_hidden_layers == 2 and bundle.model.config.hidden_size == 576
    assert sum(p.numel() for p in bundle.model.parameters()) == sum(p.numel() for p in meta_model(node).parameters())
    ids = bundle.tokenizer("a test", return_tensors="pt")["input_ids"]
    assert bundle.model(input_ids=ids).logits.shape[-1] == 49152
    again = build_model(node).model.state_dict()
    assert all(torch.equal(v, again[k]) for k, v in bundle.model.state_dict().items())  # seeded
    with pytest.raises(ConfigError, match="model.name=acme/none: no architecture shipped"):
        build_model(OmegaConf.merge(node, {"name": "acme/none"}))


def test_a_shallower_random_qwen2_keeps_its_per_layer_fields_consistent(tmp_path):
    """model.num_layers on Qwen2 (the GPU check's architecture): its per-layer fields (layer_types,
    max_window_layers) follow the depth, so the config saves, as the vLLM engine's sync saves it."""
    from transformers import AutoConfig

    from cl_bench.models import random_architecture_config

    config = random_architecture_config("Qwen/Qwen2-1.5B", num_layers=2)
    assert config.num_hidden_layers == 2 and config.max_window_layers == 2
    assert len(getattr(config, "layer_types", None) or [None] * 2) == 2
    config.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).num_hidden_layers == 2
