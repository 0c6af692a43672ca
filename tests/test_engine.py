"""The generation engine's seam without vLLM: the HF engine's seeded sampling against transformers'
own sampling, a request's draws independent of its batch, and the stacked LoRA adapter that vLLM is
handed, loaded back by peft, against the model with its adapters."""

from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from cl_bench.generation.engine import HFEngine, SeededSampling, cut_at_eos
from cl_bench.generation.lora_handover import active_rank, save_stacked_adapter, stacked_adapter
from cl_bench.models import tiny_llama

PROMPTS = [[1, 5 + i, 9, 40 + 3 * i, 7][: 3 + i % 3] for i in range(6)]


def test_seeded_sampling_draws_each_row_from_transformers_tempered_top_p_distribution():
    """4000 requests of one prompt, each under its own seed: their tokens' frequencies match the
    distribution transformers' temperature and top-p warpers give (the reference); a token top-p
    removes is never drawn."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    ref = torch.softmax(TopPLogitsWarper(0.9)(None, TemperatureLogitsWarper(0.7)(None, logits.clone())), -1)[0]
    counts = torch.zeros(5)
    processor = SeededSampling(range(4000), 0.7, 0.9, torch.device("cpu"))  # 4000 requests
    out = processor(None, logits.repeat(4000, 1))
    picked = out.argmax(-1)
    assert torch.isinf(out).sum() == 4000 * 4  # one finite logit per row: greedy takes it
    counts.index_add_(0, picked, torch.ones(4000))
    assert counts[ref == 0].sum() == 0
    assert torch.allclose(counts / 4000, ref, atol=0.03)


def test_a_requests_draws_depend_on_its_seed_alone_not_on_its_batch():
    model = tiny_llama(seed=0).model
    engine = HFEngine(batch_size=4, model=model)
    sampling = {"temperature": 1.0, "top_p": 1.0}
    seeds = [11 * i for i in range(len(PROMPTS))]
    together = engine.generate(PROMPTS, 8, eos_token_id=2, pad_token_id=0, sampling=sampling, seeds=seeds)
    alone = [engine.generate([p], 8, 2, 0, sampling, [s])[0] for p, s in zip(PROMPTS, seeds)]
    assert together == alone
    assert len({tuple(c) for c in together}) > 3  # sampled
    again = engine.generate(PROMPTS, 8, 2, 0, sampling, [s + 1 for s in seeds])
    assert again != together  # other seeds, other draws
    greedy = engine.generate(PROMPTS, 8, 2, 0)
    ids = torch.tensor([PROMPTS[0]])
    reference = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert greedy[0] == cut_at_eos(reference[0, ids.shape[1] :].tolist(), 2)[0]  # transformers' greedy


def three_adapter_model():
    """A tiny Llama with three LoRA adapters of different ranks and scalings, all active (IncLoRA's
    and O-LoRA's forward pass), their B's random so that each one changes the output."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(seed=0).model
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("task2", LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("task3", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    model.base_model.set_adapter(["default", "task2", "task3"])
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model.eval()


def test_the_stacked_adapter_is_the_sum_of_the_active_adapters_deltas_as_peft_computes_them():
    model = three_adapter_model()
    tensors, rank, targets = stacked_adapter(model)
    assert rank == active_rank(model) == 10 and targets == ["q_proj", "v_proj"]
    for name, layer in model.named_modules():
        if hasattr(layer, "lora_A") and hasattr(layer, "get_delta_weight"):
            peft_sum = sum(layer.get_delta_weight(a) for a in ("default", "task2", "task3"))
            stacked = tensors[f"{name}.lora_B.weight"] @ tensors[f"{name}.lora_A.weight"]
            assert torch.allclose(stacked, peft_sum, atol=1e-6), name
    model.base_model.set_adapter(["default"])  # the first adapter alone: another sum
    first, _, _ = stacked_adapter(model)
    key = next(k for k in first if k.endswith("lora_B.weight"))
    assert first[key].shape[1] == 4 and torch.equal(first[key], tensors[key][:, :4])  # its columns lead the stack


def test_peft_loads_the_stacked_adapter_to_the_three_adapter_models_logits(tmp_path):
    """What vLLM is handed, read by the reference library: peft's ``from_pretrained`` on the base
    model gives the logits of the model with its three adapters (not those of the first alone)."""
    from peft import PeftModel

    model = three_adapter_model()
    ids = torch.tensor([PROMPTS[0] + PROMPTS[3]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        model.base_model.set_adapter(["default"])
        first_only = model(input_ids=ids).logits
        model.base_model.set_adapter(["default", "task2", "task3"])
    save_stacked_adapter(model, tmp_path / "adapter", torch.float32)
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0).model, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, first_only, atol=1e-3)


def test_an_adapter_stack_wider_than_vllm_reserves_is_refused_by_key():
    from cl_bench.errors import ConfigError
    from cl_bench.generation.vllm_engine import lora_rank_slot

    assert [lora_rank_slot(r) for r in (4, 10, 24, 320)] == [8, 16, 32, 320]
    with pytest.raises(ConfigError, match="eval.engine=vllm: the LoRA adapters stack to rank 600"):
        lora_rank_slot(600)


def test_an_adapter_on_an_embedding_is_refused_by_name_not_dropped():
    """peft keeps an embedding's LoRA weights apart from the linear layers'; the stack would leave
    them out and vLLM would evaluate another model, so the handover refuses it."""
    from peft import LoraConfig, get_peft_model

    from cl_bench.errors import ConfigError

    model = get_peft_model(tiny_llama(seed=0).model, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(ConfigError, match="embed_tokens is an embedding with adapters"):
        stacked_adapter(model)
