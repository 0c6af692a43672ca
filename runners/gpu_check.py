"""The GPU path measured in one command: ``make gpu-check`` (``python -m runners.gpu_check``).

On a machine with a CUDA GPU, within a wall-time budget (``--budget-s``, 480 by default), it
measures and writes ``gpu_check.json`` and ``gpu_check.md`` (both rewritten after every section,
so a check cut short keeps what it measured):

1. ``environment``: the card, its memory, the versions of torch, CUDA, lightning, transformers, peft.
2. ``sft_step``: the SFT training step at bf16-mixed on a Qwen2-1.5B-shaped model with random
   weights (``model=random``), 4 x 1024 tokens: tokens/s and MFU (model FLOPs per second over the card's dense bf16
   peak; FLOPs per token = 6 x the parameters of every matrix product, the LM head included, plus
   12 x layers x hidden size x sequence length for attention, PaLM's count), and the bare-loop
   ratio of ``runners.bench`` at that size.
3. ``streams``: ``python -m runners.cl`` on a 2-task stream under ``trainer=gpu`` and
   ``trainer=fsdp`` (one device), bf16-mixed, each to "finished" with R written.
4. ``generation``: Hugging Face ``generate`` answer tokens/s through the run's engine for an
   evaluation (greedy, batched) and for GRPO's rollouts (G sampled completions per prompt).
5. ``memory``: each method's peak GPU memory over a short 2-task run (``torch.cuda.max_memory_allocated``)
   against ``runners.plan``'s prediction for the same config, as many methods as the budget allows.

``--small`` runs the same sections on the CPU at the tiny model's size (a few steps, fp32, the CPU
trainers), so the check is rehearsed by the test suite and cannot rot; there the memory section
reports the plan only (no CUDA counter) and MFU is not computed.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import open_dict

from cl_bench.files import atomic_write

#: dense bf16 peak TFLOP/s (no sparsity) by the name CUDA reports: the MFU's denominator
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
#: the methods whose peak memory is compared with the plan
METHODS = ("sft", "ewc", "fggm", "agem", "lwf", "olora", "grpo")
#: a short 2-task stream: short answers, few steps, no probe, no logger
SHORT_STREAM = [
    "tasks.order=[arith,sentiment]",
    "tasks.num_train=8",
    "train.batch_size=4",
    "eval.max_examples=4",
    "eval.max_new_tokens=8",
    "general=none",
    "logger=none",
    "checkpoint.every_n_steps=null",
]


class Sizes:
    """What the check runs at: a Qwen2-1.5B-shaped model on a GPU, the tiny model on the CPU."""

    def __init__(self, small: bool):
        self.small = small
        self.model = ["model=tiny_llama"] if small else ["model=random", "model.name=Qwen/Qwen2-1.5B"]
        self.trainer = ["trainer=cpu"] if small else ["trainer=gpu"]
        self.fsdp = ["trainer=fsdp", "trainer.devices=1"] + (
            ["trainer.accelerator=cpu", "trainer.precision=32-true"] if small else []
        )
        self.batch, self.seq = (4, 64) if small else (4, 1024)
        self.steps, self.warmup = (3, 1) if small else (10, 3)
        self.prompts, self.new_tokens = (8, 8) if small else (64, 128)
        self.rollout_prompts, self.group = (2, 4) if small else (8, 8)


def peak_tflops(name: str) -> float | None:
    """The card's dense bf16 peak by its name (the longest matching key), None when unknown."""
    matches = [k for k in BF16_PEAK_TFLOPS if k in name]
    return BF16_PEAK_TFLOPS[max(matches, key=len)] if matches else None


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6 x the weights of every matrix product (the linear layers and
    the LM head, tied or not) + 12 x layers x hidden x sequence (attention scores and values)."""
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    config = model.config
    return 6 * matmul + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def environment() -> dict[str, Any]:
    import lightning
    import peft
    import transformers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out |= {
            "device": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "bf16_peak_tflops": peak_tflops(props.name),
        }
    else:
        out["device"] = f"cpu ({torch.get_num_threads()} threads)"
    return out


def sft_step(sizes: Sizes, out_dir: Path) -> dict[str, Any]:
    """``runners.bench``'s two paths at this size; tokens/s and MFU of the Lightning path."""
    from runners.bench import run_bench
    from runners.cl import compose_config

    overrides = [*sizes.model, *sizes.trainer, f"paths.output_dir={out_dir}"]
    cfg = compose_config(overrides, runnable=True)
    with open_dict(cfg):
        cfg.bench = {
            "steps": sizes.steps,
            "warmup": sizes.warmup,
            "batch_size": sizes.batch,
            "seq_len": sizes.seq,
            "repeats": 1,
        }
    result = run_bench(cfg)
    tokens_s = sizes.batch * sizes.seq / result["lightning_s_per_step"]
    from cl_bench.models import build_model

    model = build_model(cfg.model).model
    per_token = flops_per_token(model, sizes.seq)
    peak = peak_tflops(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None
    return {
        "model": result["model"],
        "precision": cfg.trainer.precision,
        "batch": result["batch"],
        "bare_s_per_step": result["bare_s_per_step"],
        "lightning_s_per_step": result["lightning_s_per_step"],
        "lightning_over_bare": result["ratio"],
        "tokens_per_s": tokens_s,
        "tflops_per_token": per_token / 1e12,
        "mfu": None if peak is None else per_token * tokens_s / (peak * 1e12),
    }


def memory(sizes: Sizes, out_dir: Path, methods: tuple[str, ...], deadline: float) -> list[dict[str, Any]]:
    """Each method's short 2-task run in this process; its peak GPU memory against the plan (the
    methods after ``deadline``, a ``time.perf_counter`` value, are recorded as skipped)."""
    from cl_bench.memory_plan import GIB, plan
    from cl_bench.stream_run import run
    from runners.cl import compose_config

    rows = []
    for method in methods:
        paradigm = ["learning=grpo", "learning.num_generations=4", "method=sft"] if method == "grpo" else []
        lora = ["model.lora.enabled=true"] if method == "olora" else []
        overrides = [
            *sizes.model,
            *sizes.trainer,
            *SHORT_STREAM,
            *(paradigm or [f"method={method}"]),
            *lora,
            f"paths.output_dir={out_dir / method}",
        ]
        cfg = compose_config(overrides, runnable=True)
        planned = plan(cfg)
        row: dict[str, Any] = {"method": method, "planned_gib": planned.total / GIB}
        if time.perf_counter() > deadline:
            rows.append({**row, "status": "skipped: out of the check's time budget"})
            continue
        start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            recorder = run(cfg, cfg.paths.output_dir)
            row["status"] = "finished" if len(recorder.R) == 3 else "incomplete"
        except Exception as e:  # one method's failure is recorded; the others still run
            row["status"] = f"failed: {type(e).__name__}: {e}"
        row["seconds"] = time.perf_counter() - start
        if torch.cuda.is_available():
            row["measured_gib"] = torch.cuda.max_memory_allocated() / GIB
            row["measured_over_planned"] = row["measured_gib"] / row["planned_gib"]
        rows.append(row)
    return rows


def generation(sizes: Sizes) -> dict[str, Any]:
    """Answer tokens/s of the HF engine: an evaluation's greedy answers and GRPO's rollouts."""
    from cl_bench.data.tokenization import encode_prompt
    from cl_bench.generation.engine import HFEngine
    from cl_bench.models import build_model
    from cl_bench.run_config import build_stream
    from runners.cl import compose_config

    cfg = compose_config([*sizes.model])
    bundle = build_model(cfg.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = bundle.model.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    tok = bundle.tokenizer
    examples = [ex for task in build_stream(cfg.tasks) for ex in task.test]
    prompts = [encode_prompt(tok, ex, 256)["input_ids"] for ex in examples[: sizes.prompts]]
    engine = HFEngine(batch_size=16, model=model)
    out: dict[str, Any] = {"dtype": str(model.dtype).removeprefix("torch.")}

    def timed(*args) -> tuple[float, int]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        new = engine.generate(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, sum(map(len, new))

    engine.generate(prompts[:2], 4, tok.eos_token_id, tok.pad_token_id)  # warm-up
    seconds, tokens = timed(prompts, sizes.new_tokens, tok.eos_token_id, tok.pad_token_id)
    out["evaluation"] = {
        "prompts": len(prompts),
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
    }
    group = [p for p in prompts[: sizes.rollout_prompts] for _ in range(sizes.group)]
    engine.batch_size = len(group)  # a step's groups in one call, as a run samples them
    sampling = {"temperature": 1.0, "top_p": 1.0}
    seeds = list(range(len(group)))
    seconds, tokens = timed(group, sizes.new_tokens, tok.eos_token_id, tok.pad_token_id, sampling, seeds)
    out["rollouts"] = {
        "prompts": sizes.rollout_prompts,
        "group": sizes.group,
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
    }
    return out


def streams(sizes: Sizes, out_dir: Path, deadline: float) -> list[dict[str, Any]]:
    """``python -m runners.cl`` under the single-device and the FSDP trainer, each to its end; each
    run gets its share of the time left before ``deadline`` (a ``time.perf_counter`` value), and one
    that outlasts it is recorded as timed out."""
    runs = (("gpu", sizes.trainer), ("fsdp", sizes.fsdp))
    rows = []
    for k, (name, trainer) in enumerate(runs):
        run_dir = out_dir / f"stream-{name}"
        args = [*sizes.model, *trainer, *SHORT_STREAM, f"hydra.run.dir={run_dir}"]
        start = time.perf_counter()
        timeout = max(60.0, (deadline - start) / (len(runs) - k))
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "runners.cl", *args], capture_output=True, text=True, timeout=timeout
            )
            code, error = proc.returncode, None if proc.returncode == 0 else proc.stderr[-2000:]
        except subprocess.TimeoutExpired:
            code, error = None, f"timed out after {timeout:.0f} s"
        results = run_dir / "results.json"
        data = json.loads(results.read_text()) if results.is_file() else {}
        rows.append(
            {
                "trainer": name,
                "exit": code,
                "status": data.get("status", "no results.json") if code is not None else "timed out",
                "R_rows": len(data.get("R", [])),
                "precision": (data.get("config") or {}).get("trainer", {}).get("precision"),
                "seconds": time.perf_counter() - start,
                "error": error,
            }
        )
    return rows


def markdown(report: dict[str, Any]) -> str:
    """The report as short tables (the same numbers as the JSON)."""
    env = report["sections"].get("environment", {})
    lines = [f"# GPU check, {report['date']}: {env.get('device', '?')}", ""]
    lines.append(" · ".join(f"{k} {v}" for k, v in env.items() if k != "device"))
    step = report["sections"].get("sft_step")
    if isinstance(step, dict) and "tokens_per_s" in step:
        mfu = "-" if step["mfu"] is None else f"{100 * step['mfu']:.1f}%"
        lines += [
            "",
            "| SFT step | precision | batch | s/step | tokens/s | MFU | Lightning / bare |",
            "|---|---|---|---|---|---|---|",
            f"| {step['model']} | {step['precision']} | {step['batch']} | {step['lightning_s_per_step']:.3f} "
            f"| {step['tokens_per_s']:.0f} | {mfu} | {step['lightning_over_bare']:.3f} |",
        ]
    rows = report["sections"].get("memory")
    if isinstance(rows, list):
        lines += ["", "| method | status | planned GiB | measured GiB | measured / planned |", "|---|---|---|---|---|"]
        for r in rows:
            measured = r.get("measured_gib")
            ratio = r.get("measured_over_planned")
            lines.append(
                f"| {r['method']} | {r['status'][:60]} | {r['planned_gib']:.2f} | "
                f"{'-' if measured is None else f'{measured:.2f}'} | {'-' if ratio is None else f'{ratio:.2f}'} |"
            )
    gen = report["sections"].get("generation")
    if isinstance(gen, dict) and "evaluation" in gen:
        lines += [
            "",
            "| generation (HF engine) | dtype | answers | tokens | s | tokens/s |",
            "|---|---|---|---|---|---|",
        ]
        for key in ("evaluation", "rollouts"):
            g = gen[key]
            answers = g["prompts"] * g.get("group", 1)
            lines.append(
                f"| {key} | {gen['dtype']} | {answers} | {g['tokens']} | {g['seconds']:.2f} | {g['tokens_per_s']:.0f} |"
            )
    runs = report["sections"].get("streams")
    if isinstance(runs, list):
        lines += ["", "| stream run | exit | status | R rows | precision | s |", "|---|---|---|---|---|---|"]
        for r in runs:
            lines.append(
                f"| trainer={r['trainer']} | {r['exit']} | {r['status']} | {r['R_rows']} | {r['precision']} "
                f"| {r['seconds']:.0f} |"
            )
    failed = {k: v for k, v in report["sections"].items() if isinstance(v, dict) and "error" in v}
    for name, v in failed.items():
        lines += ["", f"**{name}**: {v['error'].splitlines()[-1] if v['error'] else 'failed'}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the CPU rehearsal: the tiny model, a few steps")
    parser.add_argument("--out", default="outputs/gpu_check", help="folder of gpu_check.json and gpu_check.md")
    parser.add_argument("--work", default=None, help="folder of the runs' dirs and checkpoints (default: --out)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall seconds for all sections")
    parser.add_argument("--methods", default=",".join(METHODS), help="the methods of the memory section")
    args = parser.parse_args(argv)
    if not args.small and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; --small rehearses the check on the CPU", file=sys.stderr)
        return 2
    sizes = Sizes(args.small)
    out, work = Path(args.out), Path(args.work or args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "small": args.small, "sections": {}}
    methods = tuple(m for m in args.methods.split(",") if m)
    deadline = start + args.budget_s
    sections = [  # (name, what, the share of the budget it needs left to start)
        ("environment", environment, 0),
        ("sft_step", lambda: sft_step(sizes, work / "bench"), 0.05),
        ("streams", lambda: streams(sizes, work, deadline - 0.3 * args.budget_s), 0.2),  # time left for the rest
        ("generation", lambda: generation(sizes), 0.1),
        ("memory", lambda: memory(sizes, work / "memory", methods, deadline), 0.1),
    ]
    for name, section, needs in sections:
        left = args.budget_s - (time.perf_counter() - start)
        if left < needs * args.budget_s:
            report["sections"][name] = {"error": f"skipped: {left:.0f} s of the budget left"}
            continue
        t = time.perf_counter()
        try:
            report["sections"][name] = section()
        except Exception:
            report["sections"][name] = {"error": traceback.format_exc(limit=4)}
        print(f"gpu_check: {name} in {time.perf_counter() - t:.1f} s", flush=True)
        report["seconds"] = time.perf_counter() - start
        atomic_write(out / "gpu_check.json", json.dumps(report, indent=2, default=str))
        atomic_write(out / "gpu_check.md", markdown(report))
    print(markdown(report))
    failed = [n for n, v in report["sections"].items() if isinstance(v, dict) and "error" in v]
    for name, key in (("memory", "method"), ("streams", "trainer")):
        rows = report["sections"].get(name)
        if isinstance(rows, list):
            failed += [f"{name}:{r[key]}" for r in rows if r["status"] != "finished"]
    if failed:
        print(f"gpu_check: not all sections finished: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
