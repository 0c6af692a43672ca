"""Check a stream's data folder and write its manifest:
``python -m runners.data check DIR --stream trace|long_sequence|standard|superni [--out FILE] [OVERRIDES...]``.

Reads every task of the stream from ``DIR`` through the loader a run uses (so the same files are
refused for the same reasons, by name), whole (no caps, every task of the config in its declared
order), and prints per task and split the example count, the published count where the stream has
a protocol (``protocol`` in conf/tasks/<stream>.yaml), the file's SHA-256 and, for classification
tasks, the label distribution. Writes it all, with the manifest's digest, to
``manifest-<stream>.json`` in the current folder (or ``--out``; never into DIR by default: shared
data is often read-only): a run on these files records the same ``manifest_sha256`` in its results.json.
Exit status: 0 when every count matches the protocol (or there is none), 1 when some differ, 2 when
the folder cannot be read as the stream.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cl_bench.data.manifest import check_stream, render
from cl_bench.errors import ConfigError
from cl_bench.files import atomic_write
from cl_bench.run_config import build_stream
from runners.cl import CONF_DIR, compose_config

#: the streams read from a folder (the embedded one is generated, not checked)
STREAMS = sorted(p.stem for p in (CONF_DIR / "tasks").glob("*.yaml") if "data_dir:" in p.read_text())


def quoted(value: str) -> str:
    """``value`` as a quoted Hydra override value (a path may hold '=', ',' or spaces)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def check(folder: Path, stream_name: str, out: Path | None, overrides: list[str]) -> int:
    cfg = compose_config(
        [
            f"tasks={stream_name}",
            f"tasks.data_dir={quoted(str(folder))}",
            "tasks.order=null",
            "tasks.subset=null",
            *overrides,
        ]
    )
    for cap in ("num_train", "num_eval", "num_test"):
        if cap in cfg.tasks:
            cfg.tasks[cap] = None
    if "max_examples" in cfg.tasks:
        cfg.tasks.max_examples = None
    manifest = check_stream(build_stream(cfg.tasks), cfg.tasks.get("protocol"))
    manifest = {"stream": stream_name, "data_dir": str(folder.resolve()), **manifest}
    print(render(manifest))
    target = out or Path(f"manifest-{stream_name}.json")
    atomic_write(target, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    print(f"manifest: {target}")
    return 1 if manifest["differ_from_protocol"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    checker = commands.add_parser("check", help="count, hash and check a stream's data folder; write its manifest")
    checker.add_argument("folder", type=Path, help="the folder that holds the stream's task folders")
    checker.add_argument("--stream", required=True, choices=STREAMS, help="the stream (conf/tasks/<name>.yaml)")
    checker.add_argument(
        "--out", type=Path, default=None, help="where to write the manifest (default: ./manifest-STREAM.json)"
    )
    args, overrides = parser.parse_known_args(argv)
    try:
        return check(args.folder, args.stream, args.out, overrides)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
