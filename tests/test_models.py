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
