"""Train a causal LM on a stream of tasks and record the continual-learning score matrix.

    python -m runners.cl [method=...] [model=...] [tasks=...] [trainer=...] [logger=...] [seed=...]

Hydra composes the config; :class:`cl_bench.stream_run.StreamRun` does the rest (see its module
doc). Results land in the Hydra run dir.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import cl_bench.config  # noqa: F401  (the config's own resolvers, before Hydra resolves run_name)
from cl_bench.errors import ConfigError, RunDirInUse, is_user_error
from cl_bench.override_keys import suggest_closest_keys
from cl_bench.secrets import hide_secrets_in_hydra_logs

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # absolute: main also runs as runners.cl.main
suggest_closest_keys()  # optimzer.lr=... names optimizer.lr, not Hydra's "+optimzer.lr"
hide_secrets_in_hydra_logs()  # its launchers log every job's overrides, +api_token=... included


def compose_config(overrides: list[str], runnable: bool = False) -> DictConfig:
    """The run config these overrides compose, as ``python -m runners.cl`` would (no Hydra run
    started: for the tools that read a run's config without running it). ``runnable``: Hydra's own
    settings are set as a run's are (the run name's ``${hydra:...}`` resolves), so that
    ``cl_bench.stream_run.run`` can run it in this process."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=runnable)
    if runnable:
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """One run; returns ``cfg.objective`` (a CL metric, e.g. op or bwt) for sweepers such as Optuna.

    In a multirun a failed job has already written its error to its results.json; it is logged and
    returns NaN (Optuna records a failed trial) so that the rest of the sweep goes on. A single run
    stopped by what its user fixes (bad input, which names the key or file; a full or read-only
    disk; divergence) prints that one line and exits with status 1; ``HYDRA_FULL_ERROR=1`` shows
    the traceback instead. Any other error prints its traceback and exits with status 1 (not raised
    into Hydra, whose "Error executing job with overrides" line would print the command's secrets).
    """
    if cfg.get("dry_run"):  # reached only when main is called other than as `python -m runners.cl`
        print(OmegaConf.to_yaml(cfg, resolve=True))  # (that previews before Hydra starts: runners/preview.py)
        return None
    # torch and Lightning (about 4 s) load only for a run: --help, --cfg and dry_run answer at once
    from cl_bench.distributed import in_multirun, is_main
    from cl_bench.recording.console import one_line_per_bar, quiet_library_logs
    from cl_bench.recording.hydra_record import discard_backup, redact_record, remove_new_run_dir, restore_record
    from cl_bench.recording.results import RunRecorder
    from cl_bench.stream_run import StreamRun

    quiet_library_logs()
    subdir = HydraConfig.get().output_subdir if HydraConfig.initialized() else None
    stream_run = None
    if subdir is not None and is_main():
        redact_record(cfg.paths.output_dir, subdir)  # first: no secret stays in Hydra's record, whatever follows
    try:
        with one_line_per_bar():
            try:
                stream_run = StreamRun(cfg, cfg.paths.output_dir)
            except Exception:  # refused before it began: the dir keeps its earlier run's record
                if subdir is not None and is_main():
                    restore_record(cfg.paths.output_dir, subdir)
                raise
            if subdir is not None and is_main():
                discard_backup(cfg.paths.output_dir, subdir)
            recorder = stream_run.run()
    except Exception as e:
        results = Path(cfg.paths.output_dir) / "results.json"
        refused = stream_run is None and is_user_error(e)  # a bad setting, before the run began
        if refused and not in_multirun() and is_main() and remove_new_run_dir(cfg.paths.output_dir):
            pass  # a single run's new dir: the console's one line says it all, and no dir is left behind
        # it failed before its recorder existed (never into a dir that another run holds)
        elif is_main() and not results.exists() and not isinstance(e, RunDirInUse):
            config = OmegaConf.to_container(cfg, resolve=False)
            try:  # refused: a bad setting or a dir that cannot hold it, as the sweep's table says
                RunRecorder(cfg.paths.output_dir, config, [], []).write(
                    status="refused" if isinstance(e, ConfigError) else "failed", error=f"{type(e).__name__}: {e}"
                )
            except OSError as unwritable:  # the dir's disk is the problem: its error must not hide the first
                log.error("could not record the failure in %s: %s", results, unwritable.strerror or unwritable)
        if not in_multirun():
            if is_user_error(e) and not os.environ.get("HYDRA_FULL_ERROR"):
                print(f"Error: {e}", file=sys.stderr)
            else:  # printed here: raised into Hydra, it would also print the command line, secrets and all
                traceback.print_exc()
            sys.exit(1)
        hydra_cfg = HydraConfig.get()
        outcome = "refused" if isinstance(e, ConfigError) else "failed"
        if is_main():  # a row of the sweep's table even where the dir's results.json is another run's
            from cl_bench.recording.sweep_summary import record_job_end

            record_job_end(
                hydra_cfg.sweep.dir, hydra_cfg.job.num, cfg.paths.output_dir, outcome, f"{type(e).__name__}: {e}"
            )
        if is_user_error(e):  # it names the key, file or disk: one line is enough
            log.error("job %s %s: %s; the sweep goes on", hydra_cfg.job.num, outcome, e)
        else:
            log.exception("job %s failed; the sweep goes on", hydra_cfg.job.num)
        return float("nan")
    return recorder.cl_metrics().get(cfg.objective)


if __name__ == "__main__":
    # Call the importable module's main, not this __main__ copy: the joblib launcher pickles the
    # task function, which works by reference only for a function of an importable module.
    from cl_bench.recording.hydra_record import with_run_overrides
    from runners.cl import main as importable_main
    from runners.preview import main as preview
    from runners.preview import wants_preview

    if wants_preview(sys.argv):  # dry_run=true: before Hydra, so that no launcher runs and no dir is made
        sys.exit(preview(sys.argv))
    sys.argv = with_run_overrides(sys.argv)  # resume=<run dir> alone continues that run as it was started
    importable_main()
