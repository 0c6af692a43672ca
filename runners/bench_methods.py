"""Cost of each CL method: step time / SFT's, Fisher pass time / one epoch, bytes of method state.

    python -m runners.bench_methods [model=tiny_llama] [bench.methods=[sft,ewc,migu,fggm]]

Every method is measured in the state it has while training the second task of the stream (EWC
with a consolidated Fisher and anchor, FGGM with its mask, MIGU with its hooks): the first two
tasks of ``tasks`` provide the data for that set-up; the timed steps use the same random batches
(``bench.batch_size`` x ``bench.seq_len``) for every method, from the same initial weights.
"""
from __future__ import annotations

import copy
import json
import statistics
import time
from functools import partial

import hydra
import torch
from hydra import compose
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from cl_bench.module import CLModule
from cl_bench.tokenization import make_loader
from runners.bench import StepTimer, BudgetTask, make_batches
from runners.cl import build, build_trainer


def tensor_bytes(obj, seen: set | None = None) -> int:
    """Bytes of all tensors reachable from ``obj`` through attributes, dicts, lists and tuples."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Parameter):
        return 0  # the model's own weights are not method state
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("methods"):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def timed_fit(cfg, module, callbacks, loader, steps: int, warmup: int) -> float:
    timer = StepTimer(warmup)
    trainer = build_trainer(cfg, BudgetTask(steps), [*callbacks, timer])
    trainer.fit(module, loader)
    return (timer.end - timer.start) / (steps - warmup)


def measure(cfg: DictConfig, name: str, bundle, initial, stream, batches) -> dict:
    method = build(compose(config_name="bench", overrides=[f"method={name}"]).method)
    bundle.model.load_state_dict(initial)
    telemetry: dict[str, float] = {}
    module = CLModule(
        bundle.model, method, build(cfg.optimizer), build(cfg.scheduler),
        metric_sink=lambda metrics, step: telemetry.update(metrics),
        loader_factory=partial(make_loader, bundle.tokenizer, batch_size=cfg.train.batch_size,
                               max_prompt_len=cfg.train.max_prompt_len, max_ans_len=cfg.train.max_ans_len),
    )
    method.on_stream_start(module, stream)
    method.on_task_start(module, stream[0], 0)
    method.on_task_end(module, stream[0], 0)
    method.on_task_start(module, stream[1], 1)
    state = tensor_bytes(method)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    times = [timed_fit(cfg, module, [method], loader, len(batches), cfg.bench.warmup) for _ in range(cfg.bench.repeats)]
    method.on_task_end(module, stream[1], 1)
    fisher_s = telemetry.get("fggm/fisher_s", telemetry.get("ewc/fisher_s"))
    return {"method": name, "s_per_step": statistics.median(times), "all": times, "state_bytes": state,
            "fisher_s": fisher_s}


def epoch_seconds(cfg, bundle, initial, task) -> float:
    """One SFT training epoch over ``task``: the yardstick for a Fisher pass."""
    from methods.sft import SFT
    bundle.model.load_state_dict(initial)
    module = CLModule(bundle.model, SFT(), build(cfg.optimizer), build(cfg.scheduler))
    loader = make_loader(bundle.tokenizer, task.train, cfg.train.batch_size, cfg.train.max_prompt_len, cfg.train.max_ans_len)
    trainer = build_trainer(cfg, BudgetTask(len(loader)), [])
    start = time.perf_counter()
    trainer.fit(module, loader)
    return time.perf_counter() - start


@hydra.main(config_path="../conf", config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    b = cfg.bench
    bundle = build(cfg.model)
    stream = build(cfg.tasks)
    initial = copy.deepcopy(bundle.model.state_dict())
    batches = make_batches(len(bundle.tokenizer), b.warmup + b.steps, b.batch_size, b.seq_len, cfg.seed)
    rows = [measure(cfg, name, bundle, initial, stream, batches) for name in b.methods]
    epoch = epoch_seconds(cfg, bundle, initial, stream[1])
    base = next(r["s_per_step"] for r in rows if r["method"] == "sft")
    table = Table(title=f"Method cost on {bundle.name}, batch {b.batch_size}x{b.seq_len} (task 2 of the stream)")
    for col in ("method", "ms/step", "/ SFT", "state bytes", "Fisher pass s", "Fisher / epoch"):
        table.add_column(col, justify="right")
    for r in rows:
        r["ratio"] = r["s_per_step"] / base
        r["fisher_over_epoch"] = None if r["fisher_s"] is None else r["fisher_s"] / epoch
        table.add_row(r["method"], f"{1000 * r['s_per_step']:.1f}", f"{r['ratio']:.3f}", f"{r['state_bytes']:,}",
                      "-" if r["fisher_s"] is None else f"{r['fisher_s']:.2f}",
                      "-" if r["fisher_over_epoch"] is None else f"{r['fisher_over_epoch']:.2f}")
    Console(width=160).print(table)
    Console().print(f"one SFT epoch of task 2 ({len(stream[1].train)} examples): {epoch:.2f} s")
    with open(f"{cfg.paths.output_dir}/bench_methods.json", "w") as f:
        json.dump({"model": bundle.name, "epoch_s": epoch, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
