"""One run of a stream: set up, start or restore, then train and evaluate task by task.

    stream_run = StreamRun(cfg, out_dir)   # check the config, hold the run dir, build everything
    stream_run.run():
        first = start_or_restore()         # R[0] (the untrained model), or the newest checkpoint
        for i in range(first, len(stream)):
            train_task(i)                  # on_task_start, Trainer.fit, on_task_end, after_task_epoch, merge
            evaluate_stage()               # R[i + 1]: every task; record, log, checkpoint
        finish()                           # results.json status "finished", summary

Any error after set-up is written into results.json (``fail``; SIGTERM or Ctrl-C: "stopped"),
every finished stage kept. Under several processes every process runs the same calls in lockstep.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from lightning import seed_everything
from omegaconf import DictConfig, OmegaConf
from rich.rule import Rule

from cl_bench.config import build, optimizer_factory
from cl_bench.data.batching import check_every_task_trains, layout, task_steps
from cl_bench.data.loaders import TaskLoaders
from cl_bench.data.manifest import stream_data
from cl_bench.data.tasks import Task, TaskStream, training_plan
from cl_bench.data.token_cache import stream_fingerprint
from cl_bench.distributed import in_multirun, is_main, parallel_jobs, rank, share_threads, start_processes, world_size
from cl_bench.errors import as_stop, stop_on_signals
from cl_bench.evaluation.base_kl import BaseKL
from cl_bench.evaluation.continual import ContinualEvaluator, ContinualSettings
from cl_bench.evaluation.example_forgetting import stream_options, stream_right_answers
from cl_bench.evaluation.general_ability import GeneralAbility
from cl_bench.evaluation.generation import GenerationConfig, evaluate_stream
from cl_bench.evaluation.metrics import also_scores
from cl_bench.files import RunDirLock
from cl_bench.generation.build import build_engine
from cl_bench.models import build_model
from cl_bench.progress import activity, doing, heartbeat, say, work_summary
from cl_bench.recording.console import console
from cl_bench.recording.loggers import RunLoggers
from cl_bench.recording.results import RunRecorder
from cl_bench.recording.summary import print_summary
from cl_bench.rng import derive_seed, rng_state, set_rng_state
from cl_bench.run_config import build_stream, validate_run_config
from cl_bench.secrets import redact
from cl_bench.training.checkpointing import StreamCheckpoints, restore_weights, resume_command, run_dir, stage_weights
from cl_bench.training.learning import SFT, Learning
from cl_bench.training.module import CLModule
from cl_bench.training.pace import StepPace
from cl_bench.training.sharding import full_weights
from cl_bench.training.trainer import build_trainer, placement_trainer, warn_low_precision_weights

log = logging.getLogger(__name__)


class StreamRun:
    """Everything one run holds: config, method, stream, model, module, recorder, loggers, checkpoints."""

    def __init__(self, cfg: DictConfig, out_dir: str | Path):
        """Check the settings (bad ones fail here, naming the key, before the model loads), start the
        processes (DDP), build the run; nothing is trained yet."""
        validate_run_config(cfg)
        seed_everything(cfg.seed, workers=True, verbose=False)
        self.cfg = cfg
        self.method = build(cfg.method)
        self.method.check_run(cfg)  # its needs of the other groups, before anything loads
        #: how each task is learned (learning=sft|grpo|self_sft), refused here if the method cannot
        self.learning: Learning = build(cfg.learning) if cfg.get("learning") else SFT()
        self.learning.check_run(cfg, self.method)
        placement = placement_trainer(cfg, multirun=in_multirun())
        _, _, self.accumulate = layout(cfg.train.batch_size, cfg.train.get("micro_batch_size"), placement.world_size)
        start_processes(placement)  # from here on, every process runs this run in lockstep
        console.quiet = not is_main()
        share_threads(placement.num_devices * parallel_jobs())  # a sweep's jobs, DDP on the CPU: cores / processes
        t0 = time.perf_counter()
        self.stream: TaskStream = build_stream(cfg.tasks)  # validates the data before the model is loaded
        #: every file the stream was read from, hashed: results.json's ``data``
        self.data = stream_data(self.stream)
        #: what is trained, in order: the stream's tasks, or their union (tasks.joint=true)
        self.training: list[Task] = training_plan(
            self.stream, cfg.tasks.get("joint", False), cfg.train.get("shuffle", True)
        )
        check_every_task_trains(self.training, cfg.train, placement.world_size)
        self.general: GeneralAbility = build(cfg.general) if cfg.get("general") else GeneralAbility()
        self.general.check()
        self.continual = ContinualSettings.from_config(cfg.eval.get("continual"), self.stream.names)
        self.out_dir = run_dir(cfg, out_dir)
        #: eval.engine: what every evaluation and rollout generates with (vllm refused here if missing)
        rollout = OmegaConf.select(cfg, "learning.max_completion_length") or 0  # and the tasks' own budgets
        budget = max(cfg.eval.get("max_new_tokens") or 0, rollout, *(t.spec.max_new_tokens for t in self.stream))
        self.engine = build_engine(cfg.eval, self.out_dir / "engine", cfg.seed, cfg.train.max_prompt_len + budget)
        self.pace = StepPace()  # warns when the training steps slow down (other processes on the cores)
        self.lock = RunDirLock(self.out_dir)
        if is_main():
            self.lock.acquire()  # released by close(); the other processes of this run share the dir
        try:
            self._open_records(cfg)
            self._build(cfg, t0, placement)
        except BaseException:
            if hasattr(self, "loggers"):
                self.loggers.finalize("failed")
            self.lock.release()  # the run dir goes free
            raise

    def _open_records(self, cfg: DictConfig) -> None:
        """Before the model loads: the settings the run is recorded under (secrets redacted), where a
        resume continues (refused if its settings or data changed), the recorder and the loggers
        (W&B's key checked)."""
        self.config = redact(OmegaConf.to_container(cfg, resolve=True))  # as checkpoints, results and loggers keep it
        #: what a resume must find unchanged: the settings and the stream's data
        self.resume_key = {**self.config, "data_sha256": stream_fingerprint(self.stream)}
        self.checkpoints = StreamCheckpoints(self.out_dir, **cfg.checkpoint)
        # a resume's stage checkpoint, and the newest step checkpoint of the task it continues
        self.saved, self.mid_task = self.checkpoints.resume_point(self.resume_key)
        self.recorder = RunRecorder(
            self.out_dir,
            self.config,
            self.stream.names,
            [t.metric for t in self.stream],
            writes=is_main(),
            trained=[t.name for t in self.training],
            continual=self.continual,
            data=self.data,
            options=stream_options(self.stream, cfg.eval.split, cfg.eval.max_examples),
        )
        run_ids = self.saved["run_ids"] if self.saved else {}
        self.loggers = RunLoggers(
            {
                k: build(c, **({"run_id": run_ids[k]} if k in run_ids else {}))
                for k, c in (cfg.get("logger") or {}).items()
            }
            if is_main()
            else {}
        )
        if self.saved is not None:  # keep the curves logged up to where this run continues
            self.loggers.continue_from(self.saved["step_offset"] + self.checkpoints.step_of(self.mid_task))
        self.loggers.log_config({**self.config, "method_name": self.method.name})

    def _build(self, cfg: DictConfig, t0: float, placement) -> None:
        self.bundle = build_model(cfg.model)
        warn_low_precision_weights(self.bundle.model)
        self.recorder.set_timing("load_s", time.perf_counter() - t0)
        self.loaders = TaskLoaders.from_config(cfg.train, self.bundle.tokenizer)
        optimizer, reset_optimizer = optimizer_factory(cfg.optimizer)
        self.module = CLModule(  # evaluation and the methods' passes (Fisher, anchors) run where training runs
            self.bundle.model,
            self.method,
            optimizer,
            build(cfg.scheduler),
            metric_sink=self.loggers.log_metrics,
            log_every_n_steps=cfg.trainer.get("log_every_n_steps", 10),
            loaders=self.loaders,
            device=placement.strategy.root_device,
            reset_optimizer=reset_optimizer,
            precision=cfg.trainer.get("precision", "32-true"),
            learning=self.learning,
        )
        self.module.to(self.module.home_device)
        # with the untrained model (GRPO's base model is a copy of it), before any restore
        raw = self.stream.scorers == "trace"
        #: eval.kl_to_base: the base model kept to measure the KL to it at every stage (shared with GRPO's)
        self.base_kl = BaseKL.of_run(cfg.eval, self.bundle.model)
        tok, prompt_len = self.bundle.tokenizer, cfg.train.max_prompt_len
        self.learning.setup(self.module, self.stream, tok, cfg.seed, prompt_len, raw, self.base_kl, self.engine)
        with self.module.precision_context():  # the methods' passes at the run's precision
            self.method.on_stream_start(self.module, self.stream)
        self.generation = GenerationConfig.of_run(cfg.eval, prompt_len, raw, cfg.seed)
        #: scores the seen tasks during training (eval.continual; None when off)
        self.evaluator = ContinualEvaluator.of_run(
            self.continual, self.stream, tok, self.loaders, self.generation, cfg.eval.split, cfg.seed, self.engine
        )
        self.answers = {
            t.name: [e.answer for e in t.splits[cfg.eval.split][: cfg.eval.max_examples]] for t in self.stream
        }

    @property
    def tasks_done(self) -> int:
        return len(self.recorder.R) - 1

    # --- the stream ------------------------------------------------------------------------------
    def run(self) -> RunRecorder:
        """Every task still to train, each followed by its stage; on any error results.json says
        failed or stopped (and why), every finished stage kept. The run dir is let go at the end."""
        try:
            with stop_on_signals(), heartbeat(self.cfg.get("heartbeat_s") if is_main() else None):  # its clock at 0
                say(self.opening_line())
                first = self.start_or_restore()
                for i in range(first, len(self.training)):
                    self.train_task(i)
                    self.evaluate_stage()
                return self.finish()
        except BaseException as e:
            stop = as_stop(e)  # SIGTERM or Ctrl-C: "stopped", exit 143 or 130, resumable
            self.fail(stop or e, status="failed" if stop is None else "stopped")
            if stop is None:
                raise
            raise stop from e
        finally:
            self.engine.close()
            self.engine.remove_files()  # the weights it was handed: a copy of the stage's
            self.lock.release()  # the run dir goes free

    def start_or_restore(self) -> int:
        """Evaluate the untrained model (stage 0), or restore the newest readable checkpoint; returns
        the index of the first task still to train."""
        if self.saved is None:
            console.print(Rule(f"Evaluating the untrained model on {len(self.stream)} tasks"))
            self.evaluate_stage()
            return 0
        saved = self.saved
        self.method.load_state_dict(saved["method"])  # first: a method may add modules (IncLoRA's adapters)
        self.recorder.method_report = self.method.report()
        self.learning.load_state_dict(saved.get("learning") or {})
        self.recorder.learning_report = self.learning.report()
        if saved["model"] is not None:
            restore_weights(self.bundle.model, saved["model"])
        self.recorder.load_state_dict(saved["recorder"])
        self.engine.restore_timings(self.recorder.timings)  # its counters go on from the record
        self.module.resume_stream(saved["step_offset"])
        self.module.load_optimizer_state(saved.get("optimizer"))
        set_rng_state(saved["rng"])
        say(f"Resuming {self.out_dir} after {saved['tasks_done']} of {len(self.training)} tasks")
        return saved["tasks_done"]

    def train_task(self, i: int) -> None:
        """Task ``i``: the method's task start, a fresh Trainer's fit (continuing from this task's
        newest step checkpoint on a resume), the method's task end."""
        task, cfg = self.training[i], self.cfg
        cap = "" if task.max_steps is None else f", at most {task.max_steps} optimizer steps (tasks.max_steps)"
        console.print(
            Rule(
                f"Task {i + 1}/{len(self.training)}: {task.name} ({len(task.train)} examples, "
                f"{task.epochs} epoch(s){cap}, metric {task.metric})"
            )
        )
        self.module.begin_task(task.name)
        self.module.start_task_weights(task, i)  # a merging method's: pretrained or last fine-tuned
        with self.module.precision_context():
            self.method.on_task_start(self.module, task, i)
        step_checkpoint = self.checkpoints.step_callback(i, self.loggers.save)
        if self.evaluator is not None:  # the tasks trained so far (all of them in a joint run)
            self.evaluator.begin_task(i, self.stream.names if self.recorder.joint else self.stream.names[: i + 1])
        # the evaluator before the step checkpoint: a checkpoint at step s holds the point at s
        callbacks = [self.pace, self.method] + [c for c in (self.evaluator, step_checkpoint) if c is not None]
        trainer = build_trainer(cfg, task.epochs, task.max_steps, callbacks, self.accumulate)
        examples = self.method.training_examples(task, i)
        self.learning.begin_task(examples, task.name)
        doing(
            f"training {task.name} (task {i + 1}/{len(self.training)}), step",
            task_steps(len(examples), task, cfg.train, world_size(), self.learning.iterations),
            count=lambda: trainer.global_step,
        )
        share = self.method.replayed_per_batch(task, i)
        loader = self.loaders.training(
            examples,
            seed=cfg.seed + i,
            rank=rank(),
            world_size=world_size(),
            fixed_share=None if share is None else (len(task.train), share),
            **self.learning.loader_options(),
        )
        mid_task = self.mid_task if self.saved is not None and i == self.saved["tasks_done"] else None
        if mid_task is not None:
            console.print(f"Resuming task {task.name} from {mid_task.name}")
        trainer.fit(self.module, loader, ckpt_path=mid_task, weights_only=True)
        self.module.check_weights_finite()  # before anything of this task is recorded or pruned
        self.module.end_fit()
        if self.evaluator is not None:
            self.recorder.add_continual(self.evaluator.take_points())
        with self.module.precision_context():
            self.method.on_task_end(self.module, task, i)
        if extra := self.method.after_task_epoch(task, i):
            self.train_after_task_epoch(task, i, extra)
        self.module.merge_after_task(task, i)  # a merging method: the weights evaluated and carried on
        self.recorder.method_report = self.method.report()
        self.recorder.learning_report = self.learning.report()
        self.recorder.add_train_time(self.module.task_seconds())  # a resumed task's earlier seconds too

    def train_after_task_epoch(self, task: Task, i: int, examples: list) -> None:
        """One epoch over ``examples`` after task ``i``'s fit (TRACE's replay epoch); a resume repeats it."""
        console.print(f"After {task.name}: one epoch over {len(examples)} examples ({self.method.name})")
        self.learning.begin_task(examples, task.name)
        loader = self.loaders.training(
            examples,
            seed=derive_seed(self.cfg.seed + i, 1),
            rank=rank(),
            world_size=world_size(),
            **self.learning.loader_options(),
        )
        build_trainer(self.cfg, 1, None, [self.method], self.accumulate).fit(self.module, loader, weights_only=True)
        self.module.check_weights_finite()
        self.module.end_fit()

    def evaluate_stage(self) -> None:
        """The next row of R (every task of the stream), general ability when due, then record, log
        and checkpoint the stage."""
        t = time.perf_counter()
        with full_weights(self.bundle.model):  # FSDP: every process generates with the whole model
            self.engine.sync(self.bundle.model, self.module.weights_version)
            split, cap = self.cfg.eval.split, self.cfg.eval.max_examples
            scores, predictions = evaluate_stream(
                self.engine, self.bundle.tokenizer, self.stream, self.generation, split, cap
            )
            also = also_scores(self.stream, predictions, split, cap)
            self.engine.rest()
            for key, value in self.engine.timings().items():  # starts, handing weights over, generating
                self.recorder.set_timing(key, value)
            self.recorder.add_row(scores, time.perf_counter() - t, also)
            done = self.tasks_done
            activity.tasks_finished(done, len(self.training))
            say(
                f"{self.recorder.stages[-1]}: "
                + " · ".join(f"{n} {v:.1f}" for n, v in zip(self.stream.names, scores))
                + f" · {activity.times()}"
            )
            due = done == 0 or self.general.every_task or done == len(self.training)
            if due and (general := self.general.evaluate_on_main(self.bundle.model, self.bundle.tokenizer)):
                self.recorder.add_general(*general)
            if self.base_kl is not None:  # eval.kl_to_base: how far from the base model, along these answers
                self.recorder.kl_to_base.append(
                    self.base_kl.stage(
                        self.bundle.model, self.bundle.tokenizer, self.stream, predictions, split, cap, self.generation
                    )
                )
        right = stream_right_answers(self.stream, predictions, split, cap, self.cfg.eval.get("right_threshold", 50.0))
        self.recorder.write_predictions(self.answers, predictions, right)
        self.loggers.log_stage(
            self.recorder, self.module.stream_step, self.out_dir / "score_matrix.png", self.cfg.run_name
        )
        self.recorder.write()
        self.checkpoints.save_stage(self.stage_state(), done)

    def finish(self) -> RunRecorder:
        self.recorder.write(status="finished")
        self.loggers.finalize("success", self.recorder)
        if is_main():
            print_summary(self.recorder, console)
            console.print(f"Results: {self.out_dir / 'results.json'}")
        return self.recorder

    def fail(self, error: BaseException, status: str = "failed") -> None:
        """Keep what was finished: results.json says the run failed (or was stopped), and why (a full
        disk or a read-only dir is logged in one line instead), and the console the command that
        continues it from its newest checkpoint."""
        continue_with = resume_command(self.out_dir)
        why = f"{type(error).__name__}: {error}"
        if status == "stopped":
            why = f"{error}: continue it with `{continue_with}`"
        try:  # the disk's own error (full, read-only) must not hide the one that ended the run
            self.recorder.write(status=status, error=why)
        except OSError as e:
            log.error("could not record the end in %s (%s): it still says 'running'", self.out_dir, e.strerror or e)
        try:
            self.loggers.finalize("failed", self.recorder)
        except OSError as e:
            log.error("the loggers could not finish (%s)", e.strerror or e)
        if is_main():  # soft-wrapped: a command copied from a terminal must hold no line break
            console.print(
                f"The run {status}, its finished stages kept. To continue it: {continue_with}", soft_wrap=True
            )

    # --- pieces ----------------------------------------------------------------------------------
    def opening_line(self) -> str:
        answers = sum(len(t.splits[self.cfg.eval.split][: self.cfg.eval.max_examples]) for t in self.stream)
        steps = sum(
            task_steps(len(t.train), t, self.cfg.train, world_size(), self.learning.iterations) for t in self.training
        )
        return work_summary(
            len(self.training), steps, len(self.training) + 1, answers, self.general.describe(len(self.training))
        )

    def stage_state(self) -> dict[str, Any]:
        """What a stage checkpoint holds (see cl_bench/training/checkpointing.py)."""
        done = self.tasks_done
        return {
            "tasks_done": done,
            "model": stage_weights(self.bundle.model) if done else None,
            "method": self.method.state_dict(),
            **({"learning": learning} if (learning := self.learning.state_dict()) else {}),
            "recorder": self.recorder.state_dict(),
            "step_offset": self.module.step_offset,
            "optimizer": self.module.optimizer_state(),
            "rng": rng_state(),
            "run_ids": self.loggers.run_ids(),
            "config": self.checkpoints.comparable(self.resume_key),
        }


def run(cfg: DictConfig, out_dir: str | Path) -> RunRecorder:
    """The whole stream: ``StreamRun(cfg, out_dir).run()``; results are also on disk in the run dir.
    With ``resume=<run dir>`` (or a rerun in a dir with checkpoints) it goes on from the newest
    readable checkpoint: the last finished task, then the newest step within the next."""
    return StreamRun(cfg, out_dir).run()
