"""Evaluation speed: the same prompts through Hugging Face ``generate`` and the vLLM engine.

    python -m runners.bench_eval [model=smollm2_135m] [bench.eval.prompts=64] [bench.eval.max_new_tokens=128]

Takes ``bench.eval.prompts`` test prompts of the stream (round robin over its tasks), greedy, up to
``max_new_tokens`` new tokens, at ``bench.eval.dtype``; times HF ``generate`` at each of
``hf_batch_sizes`` (the project's path: prompts sorted by length and batched), then the vLLM engine
once per entry of ``vllm_variants`` (``eval.vllm`` settings changed by each, a fresh engine each;
its start on the saved weights timed apart). Tokens are counted alike for
both: the prompts' token ids, the answers re-tokenized. Prints prompt and answer tokens per second,
the ratio to HF's best, and how many answers equal HF's; writes bench_eval.json. Needs the engine
(``make install ENGINE=vllm``); without it, HF alone is measured.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from cl_bench.data.tokenization import encode_prompt
from cl_bench.evaluation.generation import GenerationConfig, generate
from cl_bench.generation.vllm_engine import VLLMEngine, VLLMSettings, vllm_available
from cl_bench.models import build_model
from cl_bench.recording.console import quiet_library_logs
from cl_bench.run_config import build_stream


def bench_prompts(cfg: DictConfig, n: int) -> list:
    """``n`` test examples of the stream, taken round robin over its tasks."""
    tasks = [t.test for t in build_stream(cfg.tasks)]
    examples = [ex for i in range(max(map(len, tasks))) for t in tasks if i < len(t) for ex in [t[i]]]
    return examples[:n]


def timed(run) -> tuple[list[str], float]:
    start = time.perf_counter()
    answers = run()
    return answers, time.perf_counter() - start


def run_bench(cfg: DictConfig) -> dict:
    b = cfg.bench.eval
    bundle = build_model(cfg.model)
    bundle.model.to(getattr(torch, b.dtype))
    tokenizer = bundle.tokenizer
    examples = bench_prompts(cfg, b.prompts)
    prompt_tokens = sum(len(encode_prompt(tokenizer, ex, cfg.train.max_prompt_len)["input_ids"]) for ex in examples)
    base = GenerationConfig(max_prompt_len=cfg.train.max_prompt_len)

    def row(engine: str, setting: str, answers: list[str], seconds: float, reference: list[str] | None) -> dict:
        tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
        return {
            "engine": engine,
            "setting": setting,
            "seconds": seconds,
            "prompt_tok_s": prompt_tokens / seconds,
            "answer_tok_s": tokens / seconds,
            "answer_tokens": tokens,
            "same_as_hf": None if reference is None else sum(a == r for a, r in zip(answers, reference)),
        }

    rows, answers_of = [], {}
    for size in b.hf_batch_sizes:
        config = replace(base, batch_size=size)
        answers, seconds = timed(lambda c=config: generate(bundle.model, tokenizer, examples, b.max_new_tokens, c))
        answers_of[f"batch {size}"] = answers
        rows.append(row("hf", f"batch {size}", answers, seconds, None))
    best = max(rows, key=lambda r: r["answer_tok_s"])
    reference = answers_of[best["setting"]]
    for r in rows:
        r["same_as_hf"] = sum(a == x for a, x in zip(answers_of[r["setting"]], reference))
    result = {"model": bundle.name, "dtype": b.dtype, "prompts": len(examples), "max_new_tokens": b.max_new_tokens}
    if vllm_available():
        for variant in b.get("vllm_variants") or [{}]:  # each a fresh engine with these eval.vllm settings
            settings = VLLMSettings(**{**cfg.eval.vllm, "dtype": b.dtype, **variant})
            longest = cfg.train.max_prompt_len + b.max_new_tokens
            engine = VLLMEngine(settings, Path(cfg.paths.output_dir) / "engine", cfg.seed, longest)
            _, start_s = timed(lambda e=engine: e.sync(bundle.model, version=0))
            answers, seconds = timed(lambda e=engine: generate(e, tokenizer, examples, b.max_new_tokens, base))
            engine.close()
            engine.remove_files()
            label = ", ".join(f"{k}={v}" for k, v in variant.items()) or "defaults"
            rows.append({**row("vllm", label, answers, seconds, reference), "start_s": start_s})
        fastest = max((r for r in rows if r["engine"] == "vllm"), key=lambda r: r["answer_tok_s"])
        result["best_vllm"] = fastest["setting"]
        result["ratio"] = fastest["answer_tok_s"] / best["answer_tok_s"]
        result["ratio_with_start"] = best["seconds"] / (fastest["seconds"] + fastest["start_s"])
    result.update(rows=rows, best_hf=best["setting"], torch_threads=torch.get_num_threads())
    return result


@hydra.main(config_path="../conf", config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    quiet_library_logs()
    result = run_bench(cfg)
    table = Table(title=f"Evaluation speed: {result['model']}, {result['dtype']}, {result['prompts']} prompts, greedy")
    for col in ("engine", "setting", "s", "prompt tok/s", "answer tok/s", "same as HF"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        same = "-" if r["same_as_hf"] is None else f"{r['same_as_hf']}/{result['prompts']}"
        table.add_row(
            r["engine"],
            r["setting"],
            f"{r['seconds']:.1f}",
            f"{r['prompt_tok_s']:.0f}",
            f"{r['answer_tok_s']:.1f}",
            same,
        )
    Console().print(table)
    if "ratio" in result:
        fastest = next(r for r in result["rows"] if r["engine"] == "vllm" and r["setting"] == result["best_vllm"])
        Console().print(
            f"vLLM ({result['best_vllm']}) / HF's best ({result['best_hf']}): {result['ratio']:.2f}x answer tokens "
            f"per second; {result['ratio_with_start']:.2f}x counting the engine's start ({fastest['start_s']:.1f} s)"
        )
    with open(f"{cfg.paths.output_dir}/bench_eval.json", "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
