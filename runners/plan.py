"""Memory per GPU of a run, before it runs: ``python -m runners.plan [--gpu-gib 80] [--json] OVERRIDES...``.

Takes the overrides of a run (``model=llama2_7b_chat trainer=fsdp trainer.devices=8 method=ewc
model.lora.enabled=true``), composes the same config, and prints weights, gradients, optimizer
state, the method's state and an activation estimate per GPU (cl_bench/memory_plan.py),
and whether they fit ``--gpu-gib`` (without it: which common GPU sizes they fit). A plan that does
not fit lists the changes under which it would (a micro-batch of 1, bf16, LoRA, FSDP). No weight
is loaded: the parameter counts come from the model's architecture.
"""

from __future__ import annotations

import argparse
import json
import sys

from cl_bench.errors import ConfigError
from cl_bench.memory_plan import GIB, GPU_SIZES, as_dict, measure, plan, render
from runners.cl import compose_config

#: changes that shrink a run's memory, tried in this order when a plan does not fit
SHRINKING = (
    ["train.micro_batch_size=1"],
    ["trainer.precision=bf16-mixed"],
    ["model.lora.enabled=true"],
    ["model.lora.enabled=true", "train.micro_batch_size=1"],
    *(["trainer=fsdp", f"trainer.devices={n}"] for n in (2, 4, 8)),
    ["trainer=fsdp", "trainer.devices=8", "train.micro_batch_size=1"],
)


def what_would_fit(overrides: list[str], gpu_gib: float) -> list[str]:
    """The changes of :data:`SHRINKING` under which the run fits ``gpu_gib`` (and its method still
    runs), each with its peak; the ones the run has already are not tried."""
    found, totals = [], set()
    for change in SHRINKING:
        if all(c in overrides for c in change):
            continue
        try:
            p = plan(compose_config([*overrides, *change]))
        except ConfigError:  # e.g. a micro-batch this batch size cannot split into
            continue
        if p.refusal is None and p.fits(gpu_gib) and p.total not in totals:  # not a plan listed already
            totals.add(p.total)
            found.append(f"  {' '.join(change):<60} {p.total / GIB:8.2f} GiB")
    return found


def positive_gib(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a GPU memory size in GiB above 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.plan", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gpu-gib",
        type=positive_gib,
        default=None,
        help="the GPU's memory: say whether the run fits, and what would if it does not",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (bytes)")
    parser.add_argument(
        "--measure",
        action="store_true",
        help="also load the model for real on this CPU and measure what the plan counts exactly "
        "(weights, gradients + optimizer, the method's state after a first task)",
    )
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = compose_config(overrides)
        result = plan(cfg)
        measured = measure(cfg) if args.measure else None
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    target = args.gpu_gib or (None if any(result.fits(g) for g in GPU_SIZES) else max(GPU_SIZES))
    fitting = what_would_fit(overrides, target) if target is not None and not result.fits(target) else None
    if args.json:
        print(
            json.dumps(
                {
                    **as_dict(result),
                    **({"measured": measured} if measured else {}),
                    **({"would_fit": [f.split("  ")[1].strip() for f in fitting]} if fitting is not None else {}),
                },
                indent=1,
            )
        )
    else:
        print(render(result, args.gpu_gib))
        if fitting is not None:
            print(
                f"would fit {target:g} GiB with:\n" + "\n".join(fitting)
                if fitting
                else f"none of micro-batch 1, bf16, LoRA or FSDP over up to 8 GPUs fits {target:g} GiB: a smaller "
                "model, or shorter train.max_prompt_len / train.max_ans_len"
            )
        if measured:
            total = sum(measured.values())
            print(
                "measured on this CPU (resident memory): "
                + ", ".join(f"{k} {v / GIB:.2f}" for k, v in measured.items())
                + f" GiB; {total / GIB:.2f} GiB against the plan's {result.states / GIB:.2f} "
                f"({total / result.states - 1:+.1%})"
            )
    return 0 if args.gpu_gib is None or result.fits(args.gpu_gib) else 1


if __name__ == "__main__":
    sys.exit(main())
