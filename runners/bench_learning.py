"""The cost of a step of each learning paradigm at the same batch: SFT, GRPO, self-SFT.

    python -m runners.bench_learning [model=smollm2_135m] [bench.steps=6] [bench.learning.paradigms=[sft,grpo]]

Every paradigm trains the same global batch (``train.batch_size`` prompts of the stream's first
task) from the same weights, through the path ``runners.cl`` uses (CLModule, the configured
Trainer). A step of GRPO or self-SFT is timed in two parts: the rollouts (sampling G completions
of each prompt and scoring them, through the run's engine: ``eval.engine=hf|vllm``, the HF engine
in batches of ``eval.batch_size`` rows, so ``eval.batch_size`` = G samples one group per call) and
the update (the forward and backward passes over the completions and the optimizer step). Telemetry
passes are left out (no logging step is timed). Prints seconds per step and the ratio to SFT's;
writes bench_learning.json.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from cl_bench.config import build, optimizer_factory
from cl_bench.data.loaders import TaskLoaders
from cl_bench.data.tasks import TaskStream
from cl_bench.generation.build import build_engine
from cl_bench.generation.engine import Engine
from cl_bench.models import build_model
from cl_bench.recording.console import one_line_per_bar, quiet_library_logs
from cl_bench.run_config import build_stream
from cl_bench.training.module import CLModule
from cl_bench.training.trainer import build_trainer
from methods.sft import SFT
from runners.bench import StepTimer

CONF = Path(__file__).resolve().parents[1] / "conf" / "learning"


def paradigm(name: str, settings: DictConfig) -> object:
    """conf/learning/<name>.yaml with ``settings`` (bench.learning.settings) for the keys it has."""
    node = OmegaConf.load(CONF / f"{name}.yaml")
    for key, value in (settings or {}).items():
        if key in node:
            node[key] = value
    return build(node)


def time_paradigm(name: str, cfg: DictConfig, bundle, initial: dict, stream: TaskStream, engine: Engine) -> dict:
    b = cfg.bench
    bundle.model.load_state_dict(initial)
    learning = paradigm(name, b.learning.settings)
    rollout_s = [0.0]
    if hasattr(learning, "rollouts"):
        sample = learning.rollouts

        def timed_rollouts(module, batch):
            start = time.perf_counter()
            out = sample(module, batch)
            if module.global_step >= b.warmup:
                rollout_s[0] += time.perf_counter() - start
            return out

        learning.rollouts = timed_rollouts
    loaders = TaskLoaders.from_config(cfg.train, bundle.tokenizer)
    module = CLModule(
        bundle.model,
        SFT(),
        optimizer_factory(cfg.optimizer)[0],
        build(cfg.scheduler),
        loaders=loaders,
        learning=learning,
    )
    module.log_every_n_steps = 10**9  # no telemetry pass in the timed steps
    learning.setup(module, stream, bundle.tokenizer, cfg.seed, cfg.train.max_prompt_len, False, engine=engine)
    task = stream[0]
    learning.begin_task(task.train, task.name)
    loader = loaders.training(task.train, seed=cfg.seed, **learning.loader_options())
    timer = StepTimer(b.warmup)
    steps = b.warmup + b.steps
    build_trainer(cfg, epochs=1 + steps // max(len(loader), 1), max_steps=steps, callbacks=[timer]).fit(module, loader)
    total = (timer.end - timer.start) / b.steps
    rollouts = rollout_s[0] / b.steps
    report = learning.report().get("tasks", {}).get(task.name, {})
    return {
        "paradigm": name,
        "s_per_step": total,
        "rollout_s": rollouts,
        "update_s": total - rollouts,
        "completion_length": report.get("completion_length"),
    }


def run_bench(cfg: DictConfig) -> dict:
    b = cfg.bench
    bundle = build_model(cfg.model)
    initial = copy.deepcopy(bundle.model.state_dict())
    stream = build_stream(cfg.tasks)
    longest = cfg.train.max_prompt_len + max(t.spec.max_new_tokens for t in stream)
    engine = build_engine(cfg.eval, Path(cfg.paths.output_dir) / "engine", cfg.seed, longest)
    try:
        rows = [time_paradigm(name, cfg, bundle, initial, stream, engine) for name in b.learning.paradigms]
    finally:
        engine.close()
        engine.remove_files()
    sft = next((r["s_per_step"] for r in rows if r["paradigm"] == "sft"), None)
    for r in rows:
        r["ratio_to_sft"] = None if sft is None else r["s_per_step"] / sft
    return {
        "model": bundle.name,
        "task": stream[0].name,
        "batch_size": cfg.train.batch_size,
        "engine": engine.name,
        "engine_batch_size": cfg.eval.batch_size,
        "engine_starts": engine.starts,
        "engine_sync_s": engine.sync_s,
        "steps": b.steps,
        "settings": OmegaConf.to_container(b.learning.settings),
        "rows": rows,
    }


@hydra.main(config_path="../conf", config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    quiet_library_logs()
    with one_line_per_bar():
        result = run_bench(cfg)
    table = Table(
        title=f"Step cost by learning paradigm: {result['model']}, {result['task']}, "
        f"batch {result['batch_size']} prompts, mean of {result['steps']} steps, rollouts by {result['engine']}"
    )
    for col in ("paradigm", "s/step", "rollouts s", "update s", "completion tokens", "/ SFT"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        length = r["completion_length"]
        table.add_row(
            r["paradigm"],
            f"{r['s_per_step']:.2f}",
            f"{r['rollout_s']:.2f}",
            f"{r['update_s']:.2f}",
            "-" if length is None else f"{length:.1f}",
            "-" if r["ratio_to_sft"] is None else f"{r['ratio_to_sft']:.1f}x",
        )
    Console().print(table)
    with open(f"{cfg.paths.output_dir}/bench_learning.json", "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
