"""GeRe: the general texts, their bands, the margin loss and the draws per step."""

import pytest
import torch

from cl_bench.errors import ConfigError
from cl_bench.models import tiny_llama
from tests.conftest import tiny_module, tiny_task

TASK = tiny_task(two_word_answers=True)


def _gere(tmp_path, **kwargs):
    import json

    from methods.gere import GeRe

    path = tmp_path / "general.jsonl"
    path.write_text(
        "\n".join(json.dumps({"text": f"General text number {i}: the {'quick ' * (i + 1)}fox."}) for i in range(5))
    )
    method = GeRe(general_data=str(path), **kwargs)
    module = tiny_module(method)
    module.log_every_n_steps = 1
    logged = {}
    module.metric_sink = lambda metrics, step: logged.update(metrics)
    method.on_stream_start(module, None)
    method.on_train_start(None, module)  # the hook that reads the training pass's hidden states
    return method, module, logged


def test_gere_thresholds_are_mean_plus_minus_std_of_the_untrained_hidden_states(tmp_path):
    method, module, logged = _gere(tmp_path)
    model = module.model.eval()
    with torch.no_grad():  # the decoder's normalised output = what the lm_head reads
        hidden = torch.cat([model.model(input_ids=torch.tensor([t])).last_hidden_state[0] for t in method.texts])
        head_input = model(input_ids=torch.tensor([method.texts[0]]), output_hidden_states=True)
    mean, std = hidden.mean(0), hidden.std(0, unbiased=False)
    torch.testing.assert_close(method.lower, mean - std, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(method.upper, mean + std, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        model.lm_head(hidden[: len(method.texts[0])]), head_input.logits[0], rtol=1e-4, atol=1e-5
    )
    first = hidden[: len(method.texts[0])]
    assert torch.equal(method.bands[0] == -1, first <= method.lower) and torch.equal(
        method.bands[0] == 1, first >= method.upper
    )
    assert logged["gere/general_texts"] == 5 and logged["gere/general_tokens"] == hidden.shape[0]


def test_gere_margin_is_zero_at_the_start_and_the_hand_value_on_a_crafted_state(tmp_path):
    from methods.gere import margin_loss

    method, module, logged = _gere(tmp_path)
    batch = next(iter(module.pass_loader(TASK.train)))
    task_loss = torch.tensor(2.0)
    loss = method.training_loss(module, batch, task_loss)
    assert logged["gere/margin"] == 0.0
    torch.testing.assert_close(loss, (logged["gere/ce_general"] + task_loss) / 2)
    lower, upper = torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 1.0])
    hidden = torch.tensor([[[-0.5, 2.0], [0.5, -3.0]], [[9.0, 9.0], [0.0, 0.0]]])
    band = torch.tensor([[[-1, 0], [1, 0]], [[0, 0], [0, 0]]], dtype=torch.int8)
    mask = torch.tensor([[1, 1], [0, 1]])
    # terms: below -0.5 -> relu(-0.5+1)=0.5; inside 2 -> 1; above 0.5 -> relu(1-0.5)=0.5;
    # inside -3 -> relu(-1+3)=2; row 2 position 1 is padding; (0, 0) inside -> 0 twice
    assert margin_loss(hidden, band, lower, upper, mask).item() == pytest.approx((0.5 + 1 + 0.5 + 2) / 4)


def test_gere_dynamic_weight_carries_no_gradient(tmp_path):
    method, module, logged = _gere(tmp_path, weight="dy")
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # so that TM > 0
    batch = next(iter(module.pass_loader(TASK.train)))
    params = list(module.model.parameters())
    from cl_bench.training.lm import causal_lm_loss

    task_loss = causal_lm_loss(module.model, batch)
    dynamic = method.training_loss(module, batch, task_loss)
    w = logged["gere/weight"]
    assert logged["gere/margin"] > 0 and w == pytest.approx(
        ((logged["gere/ce_general"] + task_loss) / 2).item() / logged["gere/margin"], rel=1e-5
    )
    got = torch.autograd.grad(dynamic, params, retain_graph=True, allow_unused=True)
    method.weight = w  # the same draw (the same stream step), the weight as a constant
    task_loss = causal_lm_loss(module.model, batch)
    fixed = torch.autograd.grad(method.training_loss(module, batch, task_loss), params, allow_unused=True)
    for a, b in zip(got, fixed):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_gere_draws_cycle_through_every_text_and_follow_the_stream_step(tmp_path):
    method, module, _ = _gere(tmp_path, per_step=2)
    draws = [method.draw(step, 0, 1) for step in range(5)]  # 10 draws = two passes over the 5 texts
    flat = [i for d in draws for i in d]
    assert sorted(flat[:5]) == sorted(flat[5:]) == list(range(5))
    # a step's texts shared over 2 micro-batches: j = 0 to the first, j = 1 to the second
    assert [method.draw(3, 0, 2), method.draw(3, 1, 2)] == [[draws[3][0]], [draws[3][1]]]
    assert method.draw(3, 2, 3) == []  # more micro-batches than texts: some get none
    state = method.state_dict()
    again, _, _ = _gere(tmp_path, per_step=2)
    again.load_state_dict(state)
    assert again.draw(4, 0, 1) == draws[4]
    again.lower = again.lower + 1
    with pytest.raises(ConfigError, match="thresholds, rebuilt from the untrained model, differ"):
        again.load_state_dict(state)


@pytest.mark.parametrize("mode", ["batch", "interleave"])
def test_gere_general_texts_per_step_do_not_depend_on_the_micro_batch_size(make_config, monkeypatch, tmp_path, mode):
    """Issue 24.5: ``per_step`` general texts per optimizer step with micro-batches of 4 and of 1
    (the same global batch of 4); the rows are the authors' tokens, no BOS or EOS, up to 563."""
    import json
    from collections import Counter, defaultdict

    from cl_bench.stream_run import run
    from methods.gere import GeRe
    from tests.conftest import instantiate_with

    path = tmp_path / "general.jsonl"
    path.write_text(
        "\n".join(json.dumps({"text": f"General text {i}: " + "word " * (300 * (i == 0) + 3)}) for i in range(5))
    )
    seen = {}
    for micro in (4, 1):

        class Counted(GeRe):
            micro_batch = micro

            def training_loss(self, module, batch, task_loss):
                self.step = seen.setdefault(self.micro_batch, defaultdict(Counter))[module.stream_step]
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):  # interleave: general rows
                    if tuple(ids[mask.bool()].tolist()) in self.rows:
                        self.step[self.rows[tuple(ids[mask.bool()].tolist())]] += 1
                return super().training_loss(module, batch, task_loss)

            def general_batch(self, picked, device):  # batch: the texts of the extra forward
                self.step.update(picked)
                return super().general_batch(picked, device)

        method = Counted(general_data=str(path), mode=mode, per_step=2, num_samples=5)
        monkeypatch.setattr("cl_bench.config.instantiate", instantiate_with(method))
        cfg = make_config(
            "method=gere",
            f"method.mode={mode}",
            "tasks.order=[arith]",
            "train.batch_size=4",
            f"train.micro_batch_size={micro}",
            "train.max_ans_len=16",
        )
        run(cfg, tmp_path / f"run{micro}")
        assert json.loads((tmp_path / f"run{micro}" / "results.json").read_text())["status"] == "finished"
    assert seen[4] and all(sum(c.values()) == 2 for c in seen[4].values())
    if mode == "batch":  # the same texts in the same steps
        assert seen[1] == seen[4]
    else:  # two general rows in every step, whatever the layout
        assert seen[1].keys() == seen[4].keys() and all(sum(c.values()) == 2 for c in seen[1].values())
    tok = tiny_llama().tokenizer
    first = tok("General text 0: " + "word " * 303, add_special_tokens=False)["input_ids"]
    assert method.texts[0] == first[:563] and len(method.texts[0]) > 16  # not cut at train.max_ans_len
    assert tok.bos_token_id not in method.texts[0] and tok.eos_token_id not in method.texts[0]


def test_gere_batch_mode_trains_the_same_weights_at_any_micro_batch_size(make_config, tmp_path):
    """Issue 24.5: not only the texts but their weight in the step: with SGD (the update is the
    gradient), 2 steps of batch 4 in micro-batches of 4 and of 1 end at the same weights (the
    micro-batch holding the step's text carries the whole step's general terms)."""
    import torch

    from cl_bench.stream_run import run

    path = tmp_path / "general.jsonl"
    path.write_text("\n".join(f'{{"text": "General text {i}: the quick brown fox."}}' for i in range(3)))
    weights = {}
    for micro in (4, 1):
        cfg = make_config(
            "method=gere",
            f"method.general_data={path}",
            "method.num_samples=3",
            "method.per_step=1",
            "tasks.order=[arith]",
            "tasks.max_steps=2",
            "train.batch_size=4",
            f"train.micro_batch_size={micro}",
            "optimizer._target_=torch.optim.SGD",
            "optimizer.lr=0.5",
            "~optimizer.betas",
            "~optimizer.eps",
            "~optimizer.fused",
            "trainer.gradient_clip_val=null",
            "eval.max_examples=1",
        )
        run(cfg, tmp_path / f"run{micro}")
        stage = sorted((tmp_path / f"run{micro}" / "checkpoints").glob("stage-*.pt"))[-1]
        weights[micro] = torch.load(stage, weights_only=True)["model"]
    moved = (
        weights[4]["model.layers.0.mlp.up_proj.weight"]
        - tiny_llama().model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    )
    assert moved.abs().max() > 1e-3
    for k in weights[4]:  # float order of 1 vs 4 examples per pass: 1.4e-6 seen; a weighting error moves 1e-3
        torch.testing.assert_close(weights[1][k], weights[4][k], rtol=1e-4, atol=1e-5)


def test_general_texts_are_read_or_refused_with_the_file_named(tmp_path):
    from methods.shared.general_texts import read_texts

    good = tmp_path / "texts.json"
    good.write_text('["one", {"text": "two"}]')
    assert read_texts(good) == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no"}\n')
    with pytest.raises(ConfigError, match=f"{bad} record 2: expected a non-empty string"):
        read_texts(bad)
    with pytest.raises(ConfigError, match="general text file not found"):
        read_texts(tmp_path / "none.jsonl")
    from methods.gere import GeRe

    with pytest.raises(ConfigError, match="method.weight must be a number >= 0 or 'dy'"):
        GeRe(weight="auto")


def test_gere_concat_mode_mixes_the_texts_into_the_data_and_scores_them_from_the_step_s_own_pass(tmp_path):
    """A batch of two task examples and two general texts: the loss equals (CE_general +
    CE_task) / 2 + w TM computed directly, TM from each general row's hidden state, and a batch
    without general rows keeps the task loss."""
    from cl_bench.training.lm import labelled_logits, token_cross_entropy
    from methods.gere import final_hidden, margin_loss

    method, module, logged = _gere(tmp_path, mode="concat", weight=3.0)
    assert method.training_examples(TASK, 1) == list(TASK.train) + method.examples and len(method.examples) == 5
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # so that TM > 0
    module.model.train()
    mixed = list(TASK.train[:2]) + method.examples[1:3]
    batch = next(iter(module.loaders.passes(mixed)))
    logits, targets = labelled_logits(module.model, batch)
    module.step_logits = (logits, targets)
    task_loss = token_cross_entropy(logits, targets, batch)
    loss = method.training_loss(module, batch, task_loss)

    def mean_ce(rows):
        return token_cross_entropy(logits[rows], targets[rows], {})

    ce_general, ce_task = mean_ce(slice(2, 4)), mean_ce(slice(0, 2))
    hidden = torch.cat(
        [
            final_hidden(
                module.model, torch.tensor([method.texts[k]]), torch.ones(1, len(method.texts[k]), dtype=torch.long)
            )[0]
            for k in (1, 2)
        ]
    )
    band = torch.cat([method.bands[1], method.bands[2]])
    tm = margin_loss(hidden[None], band[None], method.lower, method.upper, torch.ones(1, hidden.shape[0]))
    assert tm > 0 and logged["gere/margin"] == pytest.approx(tm.item(), rel=1e-4)
    torch.testing.assert_close(loss, (ce_general + ce_task) / 2 + 3.0 * tm, rtol=1e-4, atol=1e-5)
    plain = next(iter(module.loaders.passes(list(TASK.train[:2]))))
    module.step_logits = labelled_logits(module.model, plain)
    assert method.training_loss(module, plain, task_loss) is task_loss


def test_self_generated_general_texts_differ_per_text_and_follow_the_seed():
    """More texts than openings: a repeated opening gets its own continuation (each text its own
    seed), the same seed gives the same texts, another seed other texts, and the run's random state
    is left alone."""
    from cl_bench.models import tiny_llama
    from methods.shared.general_texts import OPENINGS, self_generated

    bundle = tiny_llama(seed=0)
    count = len(OPENINGS) + 2
    state = torch.get_rng_state()
    texts = self_generated(bundle.model, bundle.tokenizer, count, 6, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(set(texts)) == count  # the two repeated openings continue differently
    assert texts == self_generated(bundle.model, bundle.tokenizer, count, 6, seed=1)
    assert texts != self_generated(bundle.model, bundle.tokenizer, count, 6, seed=2)
