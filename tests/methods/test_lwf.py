"""LwF: the distillation term against a direct KL, both teachers, TRACE's reduction."""

import pytest
import torch

from cl_bench.data.tasks import Example
from cl_bench.data.tokenization import IGNORE_INDEX
from cl_bench.errors import ConfigError
from cl_bench.models import tiny_llama
from cl_bench.training.lm import labelled_logits
from tests.conftest import tiny_module, tiny_task

TASK = tiny_task(two_word_answers=True)


def _penalty(module, batch):
    """The method's penalty for ``batch`` as a training step computes it."""
    module.step_logits = labelled_logits(module.model, batch)
    return module.method.penalty(module, batch, torch.tensor(0.0))


def _direct_kl(student, teacher, batch, temperature, reverse=False):
    """Mean over answer positions of KL between tempered full-vocabulary distributions, from the
    models' plain forward passes."""
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    answer = batch["labels"][:, 1:] != IGNORE_INDEX
    p, q = torch.softmax(t[answer] / temperature, -1), torch.softmax(s[answer] / temperature, -1)
    if reverse:
        p, q = q, p
    return (p * (p.log() - q.log())).sum(-1).mean()


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_lwf_term_is_lambda_times_the_kl_to_the_previous_model(direction):
    from methods.lwf import LwF

    method = LwF(lambda_=0.7, temperature=2.0, teacher="copy", direction=direction)
    module = tiny_module(method)
    method.on_task_start(module, TASK, 1)  # the teacher: the model as it is now
    assert all(not p.requires_grad for p in method.teacher.parameters())
    teacher = tiny_llama(seed=0).model.eval()
    with torch.no_grad():  # the student moves away from the teacher
        for p in module.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = next(iter(module.pass_loader(TASK.train)))
    got = _penalty(module, batch)
    expected = 0.7 * _direct_kl(module.model, teacher, batch, 2.0, reverse=direction == "reverse")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert got.requires_grad and got.item() > 0


def test_lwf_top_k_over_the_whole_vocabulary_equals_the_copy_teacher():
    from methods.lwf import LwF

    copy_method = LwF(teacher="copy")
    module = tiny_module(copy_method)
    vocab = module.model.config.vocab_size
    topk_method = LwF(teacher="topk", top_k=vocab, cache_dtype="float32")
    copy_method.on_task_start(module, TASK, 1)
    topk_method.on_task_start(module, TASK, 1)
    assert len(topk_method.cache) == len(TASK.train)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    for batch in module.loaders.training(TASK.train, seed=3):  # other batches and padding than the cache's pass
        module.method = copy_method
        a = _penalty(module, batch)
        module.method = topk_method
        b = _penalty(module, batch)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    small = LwF(teacher="topk", top_k=3)
    small.on_task_start(module, TASK, 1)
    values, ids = next(iter(small.cache.values()))
    assert values.dtype == torch.float16 and values.shape[-1] == 3 and ids.dtype == torch.int32


def test_lwf_has_no_teacher_on_the_first_task_and_refuses_bad_settings():
    from methods.lwf import LwF

    method = LwF()
    module = tiny_module(method)
    method.on_task_start(module, TASK, 0)
    assert _penalty(module, next(iter(module.pass_loader(TASK.train)))) is None
    with pytest.raises(ConfigError, match="method.direction=reverse needs the whole teacher"):
        LwF(teacher="topk", direction="reverse")
    with pytest.raises(ConfigError, match="method.teacher must be one of"):
        LwF(teacher="cache")
    with pytest.raises(ConfigError, match="method.temperature must be > 0"):
        LwF(temperature=0)


def test_lwf_top_k_teacher_runs_the_stream(make_config):
    from cl_bench.stream_run import run

    cfg = make_config("method=lwf", "method.teacher=topk", "method.top_k=8", "tasks.order=[arith,code]")
    assert run(cfg, cfg.paths.output_dir).status == "finished"


def test_lwf_trace_reduction_is_traces_kd_loss_over_every_position():
    """Issue 24.2: ``reduction: trace`` restated from TRACE's model/Regular/LwF.py: the new and the
    previous model's logits of the whole padded batch, ``F.kl_div(log_softmax(prev / T),
    softmax(new / T), reduction="batchmean")``, added with weight 1."""
    import torch.nn.functional as F

    from cl_bench.data.tokenization import position_ids
    from cl_bench.training.lm import sequence_and_labelled_logits
    from methods.lwf import LwF

    method = LwF(teacher="copy", direction="reverse", reduction="trace")
    module = tiny_module(method)
    method.on_task_start(module, TASK, 1)
    teacher = tiny_llama(seed=0).model.eval()
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = next(iter(module.pass_loader([Example("q" + " x" * (3 * i), f"a{i} b") for i in range(4)])))
    assert (batch["attention_mask"] == 0).any()  # padding positions are part of TRACE's sum
    module.step_sequence_logits, *pair = sequence_and_labelled_logits(module.model, batch)
    module.step_logits = tuple(pair)
    got = method.penalty(module, batch, torch.tensor(0.0))
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "position_ids": position_ids(batch["attention_mask"]),
    }
    new_logits = module.model(**inputs).logits
    with torch.no_grad():
        prev_logits = teacher(**inputs).logits
    T = 2.0
    expected = F.kl_div(
        F.log_softmax(prev_logits / T, dim=-1), F.softmax(new_logits / T, dim=-1), reduction="batchmean"
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    # the project's default on the same batch: the answer positions' mean, a much smaller term
    answer = LwF(teacher="copy", direction="reverse")
    answer.teacher = method.teacher
    assert answer.penalty(module, batch, torch.tensor(0.0)).item() * 5 < got.item()
    with pytest.raises(ConfigError, match="method.reduction=trace needs the teacher's logits at every position"):
        LwF(teacher="topk", reduction="trace")
