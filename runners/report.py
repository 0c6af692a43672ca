"""Compare runs: ``python -m runners.report RUN_OR_SWEEP_DIR... [--out DIR] [--baseline sft[,migu]]``.

Reads every results.json under the given run or multirun dirs (no model is loaded), groups the
runs that differ only by seed, and writes report.md, report.html (figures embedded), summary.csv,
summary.json and the PNG figures into ``--out`` (cl_bench/recording/report.py). A malformed
results.json is left out, named with the reason, and the others are reported. Bad input the report
cannot go on with (a path that does not exist, one seed twice in a group, no readable run) is one
line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time

from cl_bench.errors import ConfigError
from cl_bench.recording.reading import find_runs
from cl_bench.recording.report import write_report
from cl_bench.recording.run_results import Refused


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run dirs, multirun dirs or results.json files")
    parser.add_argument("--out", default="report", help="where the report is written (default: ./report)")
    parser.add_argument(
        "--baseline",
        default="sft",
        help="the method the others are paired with; several comma-separated, one table each (default: sft)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals (default: 0)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    refused: list[Refused] = []
    try:
        runs = find_runs(args.paths, refused)
        summary = write_report(runs, args.out, args.baseline.split(","), args.seed, refused)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in refused:
        print(f"refused: {r.path}: {r.reason}", file=sys.stderr)
    for note in summary["different_data"]:
        print(f"note: {note}")
    print(
        f"{len(runs)} runs, {len(summary['groups'])} groups, {len(summary['failed'])} not finished, "
        f"{len(refused)} files refused; report in {args.out}/report.md and report.html "
        f"({time.perf_counter() - start:.1f} s)"
    )
    if not runs:
        print(f"error: no readable run: all {len(refused)} results.json files were refused", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
