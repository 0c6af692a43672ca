import torch

from cl_bench.data.tasks import Example
from cl_bench.data.tokenization import IGNORE_INDEX, Collator, encode_prompt, encode_train, position_ids
from cl_bench.models import tiny_llama

TOK = tiny_llama().tokenizer  # byte-level: one token per byte


def test_labels_cover_exactly_the_answer_and_eos():
    enc = encode_train(TOK, Example("Q: 2+2? Answer:", "4"), max_prompt_len=64, max_ans_len=8)
    n_prompt = 1 + len("Q: 2+2? Answer:")
    assert enc["input_ids"][0] == TOK.bos_token_id
    assert enc["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert enc["labels"][n_prompt:] == [TOK.convert_tokens_to_ids("4"), TOK.eos_token_id]
    assert enc["input_ids"][n_prompt:] == enc["labels"][n_prompt:]


def test_left_truncation_keeps_the_end_of_the_prompt_and_the_answer():
    enc = encode_train(TOK, Example("0123456789Answer:", "yes"), max_prompt_len=8, max_ans_len=3)
    assert len(enc["input_ids"]) == 8 + 3
    assert TOK.decode(enc["input_ids"][1:8]) == "Answer:"
    assert TOK.decode([i for i in enc["labels"] if i != IGNORE_INDEX], skip_special_tokens=True) == "ye"
    assert enc["labels"][-1] == TOK.eos_token_id


def test_generation_prompt_is_bos_plus_prompt():
    assert (
        encode_prompt(TOK, Example("hi", "x"), 16)["input_ids"]
        == [TOK.bos_token_id] + TOK("hi", add_special_tokens=False)["input_ids"]
    )


def test_collator_pads_on_the_left_and_masks_padding():
    a = encode_train(TOK, Example("ab", "c"), 16, 4)
    b = encode_train(TOK, Example("abcdef", "c"), 16, 4)
    batch = Collator(TOK.pad_token_id)([a, b])
    pad = len(b["input_ids"]) - len(a["input_ids"])
    assert batch["input_ids"][0, :pad].tolist() == [TOK.pad_token_id] * pad
    assert batch["attention_mask"][0].tolist() == [0] * pad + [1] * len(a["input_ids"])
    assert batch["labels"][0, :pad].tolist() == [IGNORE_INDEX] * pad
    assert batch["input_ids"][0, pad:].tolist() == a["input_ids"]


def test_position_ids_ignore_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_loss_does_not_depend_on_left_padding():
    from cl_bench.training.lm import causal_lm_loss

    model = tiny_llama().model.eval()
    short = encode_train(TOK, Example("ab", "cd"), 16, 4)
    long = encode_train(TOK, Example("abcdefgh", "ij"), 16, 4)
    alone = causal_lm_loss(model, Collator(TOK.pad_token_id)([short]))
    batch = Collator(TOK.pad_token_id)([short, long])
    padded = causal_lm_loss(model, {k: v[:1] for k, v in batch.items()})
    torch.testing.assert_close(alone, padded, rtol=1e-5, atol=1e-5)
