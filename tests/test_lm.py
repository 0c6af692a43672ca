"""Scoring only the labelled tail of a left-padded batch gives the full forward pass's values."""

import torch

from cl_bench.data.tasks import Example
from cl_bench.data.tokenization import IGNORE_INDEX, Collator, encode_train, position_ids
from cl_bench.models import tiny_llama
from cl_bench.training.lm import answer_log_likelihood, causal_lm_loss, labelled_logits

BUNDLE = tiny_llama(seed=3)
TOK = BUNDLE.tokenizer
# answers of different lengths: the rows' labelled tails start at different positions
BATCH = Collator(TOK.pad_token_id)(
    [
        encode_train(TOK, Example("a prompt of some length", "xy"), 64, 8),
        encode_train(TOK, Example("short", "a longer answer"), 64, 16),
        encode_train(TOK, Example("mid prompt", "z"), 64, 8),
    ]
)


def _full_logits():
    return BUNDLE.model(
        input_ids=BATCH["input_ids"],
        attention_mask=BATCH["attention_mask"],
        position_ids=position_ids(BATCH["attention_mask"]),
        use_cache=False,
    ).logits.float()


def test_only_the_positions_that_predict_labels_are_kept():
    logits, targets = labelled_logits(BUNDLE.model.eval(), BATCH)
    longest_answer = len("a longer answer") + 1  # + EOS
    assert targets.shape == (3, longest_answer) and logits.shape[:2] == (3, longest_answer)
    torch.testing.assert_close(logits, _full_logits()[:, -longest_answer - 1 : -1], rtol=1e-5, atol=1e-5)
    assert torch.equal(targets, BATCH["labels"][:, -longest_answer:])


def test_loss_and_log_likelihood_equal_the_full_forward_pass():
    model = BUNDLE.model.eval()
    full = model(
        input_ids=BATCH["input_ids"],
        attention_mask=BATCH["attention_mask"],
        position_ids=position_ids(BATCH["attention_mask"]),
        labels=BATCH["labels"],
        use_cache=False,
    )
    torch.testing.assert_close(causal_lm_loss(model, BATCH), full.loss, rtol=1e-5, atol=1e-6)
    labels = BATCH["labels"][:, 1:]
    logp = torch.log_softmax(_full_logits()[:, :-1], -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = (logp * (labels != IGNORE_INDEX)).sum(-1)
    torch.testing.assert_close(answer_log_likelihood(model, BATCH), expected, rtol=1e-5, atol=1e-5)
