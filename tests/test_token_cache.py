"""Tokenized training splits are cached on disk and never reused stale."""

import pytest

import cl_bench.data.tokenization as tokenization
from cl_bench.data.tasks import Example
from cl_bench.data.tokenization import EncodedDataset
from cl_bench.models import tiny_llama

TOK = tiny_llama().tokenizer


def test_a_second_encoding_of_a_split_comes_from_the_cache(tmp_path, monkeypatch):
    examples = [Example(f"question {i}? Answer:", f"{i}") for i in range(5)]
    first = EncodedDataset(TOK, examples, 16, 4, cache_dir=tmp_path).items
    assert len(list(tmp_path.glob("*.pt"))) == 1
    monkeypatch.setattr(
        tokenization, "encode_train", lambda *a: (_ for _ in ()).throw(AssertionError("tokenized again"))
    )
    assert EncodedDataset(TOK, examples, 16, 4, cache_dir=tmp_path).items == first
    # anything the encoding depends on changes the key: encoded again, never a stale entry
    for changed in ([Example("other", "x")] + examples[1:], examples[:4]):
        with pytest.raises(AssertionError, match="tokenized again"):
            EncodedDataset(TOK, changed, 16, 4, cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="tokenized again"):
        EncodedDataset(TOK, examples, 16, 3, cache_dir=tmp_path)


def test_an_unreadable_cache_file_is_encoded_again(tmp_path):
    examples = [Example("q? Answer:", "a")]
    first = EncodedDataset(TOK, examples, 16, 4, cache_dir=tmp_path).items
    (cached,) = tmp_path.glob("*.pt")
    cached.write_bytes(cached.read_bytes()[:20])  # truncated
    assert EncodedDataset(TOK, examples, 16, 4, cache_dir=tmp_path).items == first
    assert EncodedDataset(TOK, examples, 16, 4, cache_dir=tmp_path).items == first
