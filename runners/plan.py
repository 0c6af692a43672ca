"""Memory per GPU of a run, before it runs: ``python -m runners.plan [--gpu-gib 80] [--json] OVERRIDES...``.

Takes the overrides of a run (``model=llama2_7b_chat trainer=fsdp trainer.devices=8 method=ewc
model.lora.enabled=true``), composes the same config, and prints weights, gradients, optimizer
state, the method's state and an activation estimate per GPU (cl_bench/training/memory_plan.py),
and whether they fit ``--gpu-gib``. No weight is loaded: the parameter counts come from the
model's architecture.
"""
from __future__ import annotations

import argparse
import json
import sys

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from cl_bench.errors import ConfigError
from cl_bench.training.memory_plan import GIB, as_dict, measure, plan, render
from runners.cl import CONF_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-gib", type=float, default=None, help="the GPU's memory: say whether the run fits")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (bytes)")
    parser.add_argument("--measure", action="store_true",
                        help="also load the model for real on this CPU and measure what the plan counts exactly "
                             "(weights, gradients + optimizer, the method's state after a first task)")
    args, overrides = parser.parse_known_args(argv)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        result = plan(cfg)
        measured = measure(cfg) if args.measure else None
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**as_dict(result), **({"measured": measured} if measured else {})}, indent=1))
    else:
        print(render(result, args.gpu_gib))
        if measured:
            total = sum(measured.values())
            print(f"measured on this CPU (resident memory): " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in measured.items())
                  + f" GiB; {total / GIB:.2f} GiB against the plan's {result.states / GIB:.2f} "
                  f"({total / result.states - 1:+.1%})")
    return 0 if args.gpu_gib is None or result.fits(args.gpu_gib) else 1


if __name__ == "__main__":
    sys.exit(main())
