"""Train a causal LM on a stream of tasks and record the continual-learning score matrix.

    python -m runners.cl [method=...] [model=...] [tasks=...] [trainer=...] [logger=...] [seed=...]

Compose, seed, build, then for each task: method.on_task_start, trainer.fit, method.on_task_end,
evaluate every task of the stream, record. Results land in the Hydra run dir.
"""
from __future__ import annotations

import logging
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning import seed_everything
from lightning.pytorch.callbacks import RichProgressBar
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.rule import Rule

from cl_bench.batching import layout
from cl_bench.checkpointing import StreamCheckpoints, rng_state, set_rng_state
from cl_bench.config_checks import validate_run_config
from cl_bench.distributed import barrier, is_main, rank, start_processes, world_size
from cl_bench.errors import ConfigError
from cl_bench.evaluation import GenerationConfig, evaluate_task
from cl_bench.general_ability import GeneralAbility
from cl_bench.loggers import RunLoggers
from cl_bench.module import CLModule
from cl_bench.recording import RunRecorder, redact
from cl_bench.summary import print_summary
from cl_bench.tasks import TaskStream
from cl_bench.tokenization import make_loader

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # absolute: main also runs as runners.cl.main
# Logs and CI capture stdout: give tables room there instead of Rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 160)
# Lightning's per-fit banners ("GPU available", tips) would repeat once per task.
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def build(node: DictConfig, **kwargs):
    """``instantiate``, letting our own ConfigError through unwrapped (it already names the key)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise


def evaluate_stream(bundle, stream: TaskStream, cfg: DictConfig) -> tuple[list[float], dict[str, list[str]]]:
    """One row of the score matrix: every task of the stream, future ones included."""
    gen = GenerationConfig(
        batch_size=cfg.eval.batch_size, max_prompt_len=cfg.train.max_prompt_len,
        do_sample=cfg.eval.do_sample, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
    )
    scores, predictions = [], {}
    for task in stream:
        result = evaluate_task(bundle.model, bundle.tokenizer, task, gen, cfg.eval.split, cfg.eval.max_examples)
        scores.append(result.score)
        predictions[task.name] = result.predictions
    return scores, predictions


def build_trainer(cfg: DictConfig, task=None, callbacks=(), accumulate: int = 1):
    """A Lightning Trainer for one task (``task=None``: one that only tells the device and processes)."""
    if "accumulate_grad_batches" in cfg.trainer:
        raise ConfigError("trainer.accumulate_grad_batches is derived from train.batch_size (the global batch) "
                          "and train.micro_batch_size; set those instead")
    callbacks = list(callbacks)
    if task is not None and cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(RichProgressBar(leave=True))
    epochs = {} if task is None else {"max_epochs": task.epochs, "max_steps": task.max_steps or -1}
    return build(cfg.trainer, callbacks=callbacks, accumulate_grad_batches=accumulate, **epochs)


def _record_stage(
    recorder: RunRecorder, loggers: RunLoggers, step: int, answers: dict, predictions: dict
) -> None:
    recorder.write_predictions(answers, predictions)
    stage = len(recorder.R) - 1
    row = recorder.R[-1]
    metrics = {f"score/{name}": v for name, v in zip(recorder.task_names, row)}
    metrics.update({f"cl/{k}": v for k, v in recorder.cl_metrics().items()})
    if recorder.stages[-1] in recorder.general:
        metrics.update({f"general/{k}": v for k, v in recorder.general[recorder.stages[-1]].items()})
        if recorder.general_delta() is not None:
            metrics["general/delta_RG"] = recorder.general_delta()
    metrics["stage"] = stage
    loggers.log_metrics(metrics, step)
    loggers.log_table("R", ["stage"] + recorder.task_names, [[s] + r for s, r in zip(recorder.stages, recorder.R)], step)
    loggers.save()
    recorder.write()


def _evaluate_general(general: GeneralAbility, bundle, recorder: RunRecorder) -> None:
    """lm-eval on rank 0 (the harness runs in one process here); the other processes wait."""
    if general.enabled:
        if is_main():
            console.print(f"General ability: {', '.join(general.tasks)}")
            t = time.perf_counter()
            recorder.add_general(general.evaluate(bundle.model, bundle.tokenizer))
            recorder.timings.setdefault("general_s", []).append(round(time.perf_counter() - t, 3))
        barrier()


def _comparable(config: dict) -> dict:
    """The settings that decide a run's results (what a resume must not change), flattened."""
    ignored = ("paths", "resume", "logger", "checkpoint", "trainer.enable_progress_bar", "hydra")
    flat = _flatten(config)
    return {k: v for k, v in flat.items() if not any(k == p or k.startswith(p + ".") for p in ignored)}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _check_resumable(saved: dict, now: dict, run_dir: Path) -> None:
    before, after = saved["config"], _comparable(now)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        raise ConfigError(
            f"cannot resume {run_dir}: these settings differ from the run's checkpoint: "
            + ", ".join(f"{k} ({before.get(k)!r} -> {after.get(k)!r})" for k in changed[:10])
        )


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run(cfg: DictConfig, out_dir: str | Path) -> RunRecorder:
    """The whole stream; returns the recorder (results are also on disk in ``out_dir``).

    With ``resume=<run dir>`` (or a rerun in a dir that has checkpoints) the stream goes on from
    the newest readable checkpoint: the last finished task, then the newest step within the next.
    """
    validate_run_config(cfg)
    seed_everything(cfg.seed, workers=True, verbose=False)
    method = build(cfg.method)
    method.check_strategy(cfg.trainer.get("strategy", "auto"), cfg.trainer.get("devices", 1))
    probe = build_trainer(cfg)
    _, micro, accumulate = layout(cfg.train.batch_size, cfg.train.get("micro_batch_size"), probe.world_size)
    if probe.world_size > 1 and _in_multirun() and not probe.strategy.cluster_environment.creates_processes_externally:
        raise ConfigError("a local multirun cannot start DDP processes (Lightning re-runs the command line, sweep "
                          "and all, in each); sweep with hydra/launcher=slurm, which starts every run's processes")
    start_processes(probe)  # from here on, every process runs this function in lockstep
    console.quiet = not is_main()
    t0 = time.perf_counter()
    stream: TaskStream = build(cfg.tasks)  # validates the data before the model is loaded
    general: GeneralAbility = build(cfg.general) if cfg.get("general") else GeneralAbility()
    general.check()
    bundle = build(cfg.model)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    out_dir = Path(cfg.get("resume") or out_dir)
    checkpoints = StreamCheckpoints(out_dir, **cfg.checkpoint)
    saved = checkpoints.latest_stage()
    if saved is not None:
        _check_resumable(saved, resolved, out_dir)
    recorder = RunRecorder(out_dir, resolved, stream.names, [t.metric for t in stream], writes=is_main())
    recorder.set_timing("load_s", time.perf_counter() - t0)
    run_ids = saved["run_ids"] if saved else {}
    loggers = RunLoggers({k: build(c, **({"run_id": run_ids[k]} if k in run_ids else {}))
                          for k, c in (cfg.get("logger") or {}).items()} if is_main() else {})
    loggers.log_config(redact(resolved))
    module = CLModule(
        bundle.model, method, build(cfg.optimizer), build(cfg.scheduler),
        metric_sink=loggers.log_metrics, log_every_n_steps=cfg.trainer.get("log_every_n_steps", 10),
        loader_factory=partial(
            # the methods' passes (Fisher, ...) batch by the config alone, whatever the device count
            make_loader, bundle.tokenizer, batch_size=cfg.train.get("micro_batch_size") or cfg.train.batch_size,
            max_prompt_len=cfg.train.max_prompt_len, max_ans_len=cfg.train.max_ans_len,
            cache_dir=cfg.train.get("token_cache"),
        ),
    )
    # Evaluation and the methods' passes (Fisher, anchors) run where training runs; Lightning moves
    # the model back to the CPU when a fit ends, so it is put back after every fit too.
    device = probe.strategy.root_device
    module.to(device)
    method.on_stream_start(module, stream)
    answers = {t.name: [e.answer for e in t.splits[cfg.eval.split][: cfg.eval.max_examples]] for t in stream}

    def stage_state(tasks_done: int) -> dict:
        return {
            "tasks_done": tasks_done, "model": bundle.model.state_dict() if tasks_done else None,
            "method": method.state_dict(), "recorder": recorder.state_dict(), "step_offset": module.step_offset,
            "rng": rng_state(), "run_ids": loggers.run_ids(), "config": _comparable(resolved),
        }

    try:
        if saved is None:
            console.print(Rule(f"Evaluating the untrained model on {len(stream)} tasks"))
            t = time.perf_counter()
            scores, predictions = evaluate_stream(bundle, stream, cfg)
            recorder.add_row(scores, time.perf_counter() - t)
            _evaluate_general(general, bundle, recorder)
            _record_stage(recorder, loggers, module.stream_step, answers, predictions)
            checkpoints.save_stage(stage_state(0), 0)
            first = 0
        else:
            first = saved["tasks_done"]
            if saved["model"] is not None:
                bundle.model.load_state_dict(saved["model"])
            method.load_state_dict(saved["method"])
            recorder.load_state_dict(saved["recorder"])
            module.step_offset = saved["step_offset"]
            set_rng_state(saved["rng"])
            console.print(Rule(f"Resuming {out_dir} after {first} of {len(stream)} tasks"))
        for i in range(first, len(stream)):
            task = stream[i]
            console.print(Rule(f"Task {i + 1}/{len(stream)}: {task.name} ({len(task.train)} examples, "
                               f"{task.epochs} epoch(s), metric {task.metric})"))
            module.task_name = task.name
            t = time.perf_counter()
            method.on_task_start(module, task, i)
            step_checkpoint = checkpoints.step_callback(i)
            trainer = build_trainer(cfg, task, [method] + ([step_checkpoint] if step_checkpoint else []), accumulate)
            loader = module.loader_factory(
                task.train, shuffle=cfg.train.shuffle, seed=cfg.seed + i, batch_size=cfg.train.batch_size,
                micro_batch_size=micro, rank=rank(), world_size=world_size(), drop_last=cfg.train.drop_last,
            )
            mid_task = checkpoints.latest_step(i) if saved is not None and i == first else None
            if mid_task is not None:
                console.print(f"Resuming task {task.name} from {mid_task.name}")
            trainer.fit(module, loader, ckpt_path=mid_task, weights_only=True)
            # Detach the finished Trainer: its global_step must not count again after step_offset.
            module.step_offset += trainer.global_step
            module.trainer = None
            module.to(device)
            method.on_task_end(module, task, i)
            recorder.add_train_time(time.perf_counter() - t)
            t = time.perf_counter()
            scores, predictions = evaluate_stream(bundle, stream, cfg)
            recorder.add_row(scores, time.perf_counter() - t)
            if general.every_task or i == len(stream) - 1:
                _evaluate_general(general, bundle, recorder)
            _record_stage(recorder, loggers, module.stream_step, answers, predictions)
            checkpoints.save_stage(stage_state(i + 1), i + 1)
    except BaseException as e:
        recorder.write(status="failed", error=f"{type(e).__name__}: {e}")
        loggers.finalize("failed")
        raise
    recorder.write(status="finished")
    loggers.finalize("success")
    if is_main():
        print_summary(recorder, console)
        console.print(f"Results: {out_dir / 'results.json'}")
    return recorder


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """One run; returns ``cfg.objective`` (a CL metric, e.g. op or bwt) for sweepers such as Optuna.

    In a multirun a failed job has already written its error to its results.json; it is logged and
    returns NaN (Optuna records a failed trial) so that the rest of the sweep goes on.
    """
    try:
        recorder = run(cfg, cfg.paths.output_dir)
    except Exception as e:
        results = Path(cfg.paths.output_dir) / "results.json"
        if is_main() and not results.exists():  # it failed before its recorder existed
            config = OmegaConf.to_container(cfg, resolve=False)
            RunRecorder(cfg.paths.output_dir, config, [], []).write(status="failed", error=f"{type(e).__name__}: {e}")
        if not _in_multirun():
            raise
        log.exception("job %s failed; the sweep goes on", HydraConfig.get().job.num)
        return float("nan")
    return recorder.cl_metrics().get(cfg.objective)


if __name__ == "__main__":
    # Call the importable module's main, not this __main__ copy: the joblib launcher pickles the
    # task function, which works by reference only for a function of an importable module.
    from runners.cl import main as importable_main

    importable_main()
