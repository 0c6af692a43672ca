"""``dry_run=true``: the jobs a command would run, their settings and run dirs; nothing runs, no folder is made.

    python -m runners.cl -m method=sft,fggm seed=1,2 dry_run=true    # a sweep: one line per job, the
                                                                     # settings that tell the jobs apart
    python -m runners.cl method=ewc dry_run=true                     # one run: its whole config, resolved

The entry point calls :func:`preview` before Hydra starts, so no launcher is reached (the SLURM
launcher would submit the jobs) and Hydra makes no run or sweep dir. The jobs are expanded as
Hydra's basic sweeper expands them and composed as Hydra composes them; a sweeper that picks its
jobs as results come in (Optuna, ``hydra/sweeper=tune``) is shown by its search space.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def wants_preview(argv: list[str]) -> bool:
    return any(a.lstrip("+") in ("dry_run=true", "dry_run=True") for a in argv[1:])


def _compose(overrides: list[str], num: int, multirun: bool, sweep_dir: str | None = None) -> tuple[DictConfig, str]:
    """A job's config, resolved as its run would see it, and its run dir (in ``sweep_dir``, the
    sweep's dir as its first job resolved it: ``${now:...}`` moves on between jobs)."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    cfg = compose("config", overrides=overrides, return_hydra_config=True)
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.job.num = num
        if sweep_dir is not None:
            cfg.hydra.sweep.dir = sweep_dir
        HydraConfig.instance().set_config(cfg)  # the ${hydra:...} of run_name and the dirs
        out = f"{cfg.hydra.sweep.dir}/{cfg.hydra.sweep.subdir}" if multirun else str(cfg.hydra.run.dir)
        with read_write(cfg.hydra.runtime):
            cfg.hydra.runtime.output_dir = out
    HydraConfig.instance().set_config(cfg)
    return cfg, out


def _settings(cfg: DictConfig) -> dict[str, Any]:
    body = OmegaConf.to_container(cfg, resolve=True)
    body.pop("hydra")
    return body


def preview(argv: list[str]) -> str:
    """The preview of the command ``argv`` (``sys.argv``) as text."""
    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cl_bench.config import flat_settings

    multirun = bool({"-m", "--multirun"} & set(argv))
    given = [a for a in argv[1:] if not a.startswith("-")]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="cl"):
        if not multirun:
            cfg, out = _compose(given, 0, False)
            return f"# one run: {' '.join(given) or '(defaults)'}  ->  {out}\n" + OmegaConf.to_yaml(_settings(cfg))
        parsed = OverridesParser.create().parse_overrides(given)
        if any(o.key_or_group == "hydra/sweeper" and o.value() != "basic" for o in parsed):
            fixed = [
                o.input_line
                for o in parsed
                if not o.is_sweep_override() and not o.key_or_group.startswith("hydra.sweeper")
            ]
            first, _ = _compose(fixed, 0, True)
            params = first.hydra.sweeper.get("params")
            space = OmegaConf.to_container(params, resolve=False) if OmegaConf.is_config(params) else {}
            space.update({o.key_or_group: o.input_line.split("=", 1)[1] for o in parsed if o.is_sweep_override()})
            given_space = [o.input_line for o in parsed if o.key_or_group == "hydra.sweeper.params"]
            return (
                f"# {first.hydra.sweeper.get('_target_', '?').rsplit('.', 1)[-1]} chooses its "
                f"{first.hydra.sweeper.get('n_trials', '?')} jobs as results come in; nothing is run. "
                f"Search space: {' '.join([json.dumps(space), *given_space])}\n"
            )
        jobs = BasicSweeper.split_arguments(parsed, None)[0]
        first, _ = _compose(jobs[0], 0, True)
        hydra_own = [o for o in given if o.lstrip("+~").startswith(("hydra.", "hydra/"))]
        own = f" ({' '.join(hydra_own)})" if hydra_own else ""
        lines, settings, dirs = [f"# {len(jobs)} jobs{own}; nothing is run and no folder is made"], [], []
        sweep_dir = str(first.hydra.sweep.dir)
        for num, overrides in enumerate(jobs):
            cfg, out = _compose(overrides, num, True, sweep_dir)
            settings.append(flat_settings(_settings(cfg)))
            dirs.append(out)
            shown = [o for o in overrides if not o.startswith("dry_run=") and o not in hydra_own]
            lines.append(f"# job {num}: {' '.join(shown) or '(defaults)'}  ->  {out}")
    keys = sorted(
        k
        for k in set().union(*settings)  # the run dir and what sits in it are on the lines above
        if len({json.dumps(s.get(k, "-"), default=str) for s in settings}) > 1 and [s.get(k) for s in settings] != dirs
    )
    lines.append(
        f"# the {len(keys)} settings that tell the jobs apart (job 0 | 1 | ...; '-': not a setting of "
        "that job); one job's whole config: python -m runners.cl <its overrides> dry_run=true"
    )
    lines += [f"{k}: {' | '.join(str(s.get(k, '-')) for s in settings)}" for k in keys]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """Print the preview; a bad override gets Hydra's one-line error (status 1)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from cl_bench.override_keys import suggest_closest_keys

    suggest_closest_keys()
    try:
        print(preview(argv), end="")
    except (HydraException, OmegaConfBaseException) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    return 0
