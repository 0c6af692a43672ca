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

import hydra
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning import seed_everything
from lightning.pytorch.callbacks import RichProgressBar
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.rule import Rule

from cl_bench.config_checks import validate_run_config
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


def build_trainer(cfg: DictConfig, task, callbacks):
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks = [*callbacks, RichProgressBar(leave=True)]
    return build(
        cfg.trainer, max_epochs=task.epochs, max_steps=task.max_steps or -1, callbacks=callbacks
    )


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
    if general.enabled:
        console.print(f"General ability: {', '.join(general.tasks)}")
        t = time.perf_counter()
        recorder.add_general(general.evaluate(bundle.model, bundle.tokenizer))
        recorder.timings.setdefault("general_s", []).append(round(time.perf_counter() - t, 3))


def run(cfg: DictConfig, out_dir: str | Path) -> RunRecorder:
    """The whole stream; returns the recorder (results are also on disk in ``out_dir``)."""
    validate_run_config(cfg)
    seed_everything(cfg.seed, workers=True, verbose=False)
    t0 = time.perf_counter()
    stream: TaskStream = build(cfg.tasks)  # validates the data before the model is loaded
    general: GeneralAbility = build(cfg.general) if cfg.get("general") else GeneralAbility()
    general.check()
    bundle = build(cfg.model)
    method = build(cfg.method)
    method.check_strategy(cfg.trainer.get("strategy", "auto"), cfg.trainer.get("devices", 1))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    recorder = RunRecorder(out_dir, resolved, stream.names, [t.metric for t in stream])
    recorder.set_timing("load_s", time.perf_counter() - t0)
    loggers = RunLoggers([build(c) for c in (cfg.get("logger") or {}).values()])
    loggers.log_config(redact(resolved))
    module = CLModule(
        bundle.model, method, build(cfg.optimizer), build(cfg.scheduler),
        metric_sink=loggers.log_metrics, log_every_n_steps=cfg.trainer.get("log_every_n_steps", 10),
        loader_factory=partial(
            make_loader, bundle.tokenizer, batch_size=cfg.train.batch_size,
            max_prompt_len=cfg.train.max_prompt_len, max_ans_len=cfg.train.max_ans_len,
            cache_dir=cfg.train.get("token_cache"),
        ),
    )
    # Evaluation and the methods' passes (Fisher, anchors) run where training runs; Lightning moves
    # the model back to the CPU when a fit ends, so it is put back after every fit too.
    device = build_trainer(cfg, stream[0], []).strategy.root_device
    module.to(device)
    method.on_stream_start(module, stream)
    answers = {t.name: [e.answer for e in t.splits[cfg.eval.split][: cfg.eval.max_examples]] for t in stream}
    try:
        console.print(Rule(f"Evaluating the untrained model on {len(stream)} tasks"))
        t = time.perf_counter()
        scores, predictions = evaluate_stream(bundle, stream, cfg)
        recorder.add_row(scores, time.perf_counter() - t)
        _evaluate_general(general, bundle, recorder)
        _record_stage(recorder, loggers, module.stream_step, answers, predictions)
        for i, task in enumerate(stream):
            console.print(Rule(f"Task {i + 1}/{len(stream)}: {task.name} ({len(task.train)} examples, "
                               f"{task.epochs} epoch(s), metric {task.metric})"))
            module.task_name = task.name
            t = time.perf_counter()
            method.on_task_start(module, task, i)
            trainer = build_trainer(cfg, task, [method])
            trainer.fit(module, module.loader_factory(task.train, shuffle=cfg.train.shuffle, seed=cfg.seed + i))
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
    except BaseException as e:
        recorder.write(status="failed", error=f"{type(e).__name__}: {e}")
        loggers.finalize("failed")
        raise
    recorder.write(status="finished")
    loggers.finalize("success")
    print_summary(recorder, console)
    console.print(f"Results: {Path(out_dir) / 'results.json'}")
    return recorder


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    recorder = run(cfg, cfg.paths.output_dir)
    return recorder.cl_metrics().get("op")


if __name__ == "__main__":
    main()
