"""Cost of each CL method: step time / SFT's, Fisher pass time / one epoch, bytes of method state.

    python -m runners.bench_methods [model=tiny_llama] [bench.methods=[sft,ewc,migu,fggm]]

An entry of ``bench.methods`` is a method config name, optionally with settings after a slash
(``agft/scale=update``); ``bench.overrides`` adds settings to every entry of a method.
Every method is measured in the state it has while training the second task of the stream (EWC
with a consolidated Fisher and anchor, FGGM with its mask, MIGU with its hooks): the first two
tasks of ``tasks`` provide the data for that set-up; the timed steps use the same random batches
(``bench.batch_size`` x ``bench.seq_len``) for every method, from the same initial weights.
``bench.data=stream`` times each method on the first batches of what it trains task 2 on instead
(its ``training_examples``, at ``train.batch_size``): the cost of methods that change the data
(replay's remembered examples, GeRe's general texts in ``mode: concat``) shows there.
Each method gets its own copy of the model (its hooks stay on it), and the timed fits are
interleaved: every repeat times each method once, starting from a different method each time, so
a drift of the machine's speed during the run spreads over all methods alike. The ratio uses each
method's best repeat: on a shared machine noise only ever adds time (single steps here vary by
+-30%), so the minimum is the estimate of a method's own cost; medians are reported beside it.

A merging method (task_arithmetic, ties, magmax, opcm, fisher_merge) merges after task 1, task 2
starts where it says, and a second merge folds task 2's start into the running merge (``merge s``:
the second merge's seconds, Fisher merging's Fisher pass included; ``state bytes``: what it keeps in
host memory).

Fisher pass / epoch (EWC's and FGGM's Fisher, MAS's importance, AGFT's attribution pass) is
measured on task 2 of the stream. A pass covers min(num_samples, N)
examples and an epoch N, so the ratio depends on the task size N; it is also given for TRACE's
task sizes (500 and 5000 training examples), from the measured per-example costs.
"""

from __future__ import annotations

import copy
import gc
import itertools
import json
import statistics
import time

import hydra
import torch
from hydra import compose
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from cl_bench.config import build, optimizer_factory
from cl_bench.data.loaders import TaskLoaders
from cl_bench.models import build_model
from cl_bench.recording.console import one_line_per_bar
from cl_bench.run_config import build_stream
from cl_bench.training.module import CLModule
from cl_bench.training.trainer import build_trainer
from methods.sft import SFT
from runners.bench import StepTimer, make_batches


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
    trainer = build_trainer(cfg, epochs=1, max_steps=steps, callbacks=[*callbacks, timer])
    trainer.fit(module, loader)
    return (timer.end - timer.start) / (steps - warmup)


def method_overrides(entry: str, cfg: DictConfig) -> tuple[str, list[str]]:
    """A ``bench.methods`` entry: a method config name, optionally with settings after a slash
    (``agft/scale=update``), plus that method's ``bench.overrides``."""
    name, _, settings = entry.partition("/")
    extra = [f"method.{s}" for s in settings.split(",") if s]
    return name, [f"method={name}", *cfg.bench.get("overrides", {}).get(name, []), *extra]


def set_up(cfg: DictConfig, entry: str, bundle, initial, stream) -> dict:
    """The method of ``entry`` on its own copy of the model, in the state it has at the start of task 2."""
    name, overrides = method_overrides(entry, cfg)
    method = build(compose(config_name="bench", overrides=overrides).method)
    model = copy.deepcopy(bundle.model)
    model.load_state_dict(initial)
    telemetry: dict[str, float] = {}
    module = CLModule(
        model,
        method,
        optimizer_factory(cfg.optimizer)[0],
        build(cfg.scheduler),
        metric_sink=lambda metrics, step: telemetry.update(metrics),
        loaders=TaskLoaders.from_config(cfg.train, bundle.tokenizer),
        precision=cfg.trainer.get("precision", "32-true"),
    )
    with module.precision_context():  # the passes at the run's precision, as the runner runs them
        method.on_stream_start(module, stream)
        method.on_task_start(module, stream[0], 0)
        method.on_task_end(module, stream[0], 0)
    module.merge_after_task(stream[0], 0)  # a merging method's merge (its own precision), then where task 2 starts
    module.start_task_weights(stream[1], 1)
    with module.precision_context():
        method.on_task_start(module, stream[1], 1)
    if method.merges:  # a second merge is timed: the first only starts the running merge (TIES, OPCM)
        module.merge_after_task(stream[1], 1)
    batches = None
    if cfg.bench.get("data", "synthetic") == "stream":  # the first batches of what it trains task 2 on
        loader = module.loaders.training(method.training_examples(stream[1], 1), seed=cfg.seed + 1)
        wanted = cfg.bench.warmup + cfg.bench.steps
        batches = list(itertools.islice((b for _ in range(wanted) for b in loader), wanted))
    labelled = None if batches is None else sum(int((b["labels"] != -100).sum()) for b in batches) / len(batches)
    return {
        "method": entry,
        "module": module,
        "state_bytes": tensor_bytes(method),
        "times": [],
        "batches": batches,
        "labelled_tokens_per_step": labelled,
        "fisher_s": next(
            (v for k, v in telemetry.items() if k.endswith(("/fisher_s", "/importance_s", "/attribution_s"))), None
        ),
        "num_samples": getattr(method, "num_samples", None),
        "merge_s": next((v for k, v in telemetry.items() if k.endswith("/merge_s")), None),
    }


def time_interleaved(cfg: DictConfig, setups: list[dict], initial, batches) -> None:
    """Appends to each set-up's ``times`` one timed fit per repeat, the starting method rotating."""
    for r in range(cfg.bench.repeats):
        for s in setups[r % len(setups) :] + setups[: r % len(setups)]:
            mine = s["batches"] or batches
            loader = torch.utils.data.DataLoader(mine, batch_size=None)
            s["module"].model.load_state_dict(initial)
            s["times"].append(timed_fit(cfg, s["module"], [s["module"].method], loader, len(mine), cfg.bench.warmup))
            s["module"].end_fit()  # release the optimizer state and gradients before the next method
            s["module"].model.zero_grad(set_to_none=True)
            gc.collect()


TRACE_TASK_SIZES = (500, 5000)


def fisher_over_epoch(row: dict, epoch_s: float, n_task: int, n_target: int) -> float | None:
    """Fisher pass / epoch for a task of ``n_target`` examples, from the costs per example measured
    on a task of ``n_task`` examples (a pass covers min(num_samples, N) examples, an epoch N)."""
    if row["fisher_s"] is None:
        return None
    cap = row["num_samples"] or float("inf")  # None: the pass reads the whole training split
    per_example = row["fisher_s"] / min(cap, n_task)
    return per_example * min(cap, n_target) / (epoch_s / n_task * n_target)


def epoch_seconds(cfg, bundle, initial, task) -> float:
    """One SFT training epoch over ``task``: the yardstick for a Fisher pass."""
    bundle.model.load_state_dict(initial)
    module = CLModule(bundle.model, SFT(), optimizer_factory(cfg.optimizer)[0], build(cfg.scheduler))
    loader = TaskLoaders.from_config(cfg.train, bundle.tokenizer).training(task.train, seed=cfg.seed)
    trainer = build_trainer(cfg, epochs=1, max_steps=len(loader))
    start = time.perf_counter()
    trainer.fit(module, loader)
    return time.perf_counter() - start


@hydra.main(config_path="../conf", config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    b = cfg.bench
    with one_line_per_bar():
        bundle = build_model(cfg.model)
        stream = build_stream(cfg.tasks)
        initial = copy.deepcopy(bundle.model.state_dict())
        batches = make_batches(len(bundle.tokenizer), b.warmup + b.steps, b.batch_size, b.seq_len, cfg.seed)
        setups = [set_up(cfg, name, bundle, initial, stream) for name in b.methods]
        time_interleaved(cfg, setups, initial, batches)
        epoch = epoch_seconds(cfg, bundle, initial, stream[1])
    rows = [{k: v for k, v in s.items() if k not in ("module", "batches")} for s in setups]
    for r in rows:
        r["s_per_step"], r["median_s_per_step"] = min(r["times"]), statistics.median(r["times"])
    base = next(r["s_per_step"] for r in rows if r["method"] == "sft")
    n = len(stream[1].train)
    shape = (
        f"each method's own task-2 batches of {cfg.train.batch_size}"
        if b.get("data") == "stream"
        else f"batch {b.batch_size}x{b.seq_len}"
    )
    table = Table(title=f"Method cost on {bundle.name}, {shape} (task 2 of the stream)")
    columns = [
        "method",
        "ms/step (best)",
        "median",
        "/ SFT",
        "state bytes",
        "merge s",
        "Fisher pass s",
        f"Fisher / epoch (N={n})",
    ]
    for col in columns + [f"(N={size})" for size in TRACE_TASK_SIZES]:
        table.add_column(col, justify="right")
    for r in rows:
        r["ratio"] = r["s_per_step"] / base
        r["fisher_over_epoch"] = {size: fisher_over_epoch(r, epoch, n, size) for size in (n, *TRACE_TASK_SIZES)}
        table.add_row(
            r["method"],
            f"{1000 * r['s_per_step']:.1f}",
            f"{1000 * r['median_s_per_step']:.1f}",
            f"{r['ratio']:.3f}",
            f"{r['state_bytes']:,}",
            "-" if r["merge_s"] is None else f"{r['merge_s']:.2f}",
            "-" if r["fisher_s"] is None else f"{r['fisher_s']:.2f}",
            *("-" if v is None else f"{v:.2f}" for v in r["fisher_over_epoch"].values()),
        )
    Console(width=160).print(table)
    Console().print(f"one SFT epoch of task 2 ({len(stream[1].train)} examples): {epoch:.2f} s")
    with open(f"{cfg.paths.output_dir}/bench_methods.json", "w") as f:
        json.dump({"model": bundle.name, "epoch_s": epoch, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
