"""What data a run read, exactly: a SHA-256 per file and one digest of them (the data manifest),
and the check of a stream's folder against the counts its authors publish.

A run records ``data`` in results.json: its files' hashes by what they hold (``<task>/<split>``,
``<task>/labels``, ``instruction_config``) and ``manifest_sha256``, the SHA-256 of that table in
canonical JSON. ``python -m runners.data check`` writes the same table for a whole stream's folder
(``manifest-<stream>.json``), with each split's example count and label distribution, so two runs, or a run
and a folder, can be told apart by hash: runs.report never averages runs whose data differ.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

from cl_bench.data.options import answer_options
from cl_bench.data.tasks import TaskStream


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_sha256(hashes: dict[str, str]) -> str:
    """One digest of a table of file hashes (keys sorted, canonical JSON): equal iff every file is."""
    return hashlib.sha256(json.dumps(hashes, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def stream_data(stream: TaskStream) -> dict[str, Any]:
    """results.json's ``data``: the hash of every file the stream was read from, and their digest."""
    hashes = {key: file_sha256(path) for key, path in sorted(stream.files.items())}
    return {"manifest_sha256": manifest_sha256(hashes), "files": hashes}


def label_counts(answers: list[str]) -> dict[str, int] | None:
    """How often each answer occurs, most frequent first, for a classification task's split
    (:func:`~cl_bench.data.tasks.answer_options`); None for free-text answers."""
    if answer_options(answers) is None:
        return None
    return dict(sorted(Counter(answers).items(), key=lambda kv: (-kv[1], kv[0])))


def check_stream(stream: TaskStream, protocol: dict[str, dict[str, int]] | None) -> dict[str, Any]:
    """The manifest of a stream loaded whole (no caps): per task and split its file, SHA-256, example
    count, label distribution, and the published count where ``protocol`` has one; every other file
    (labels, instructions) by hash; the digest; and the counts that differ from the protocol."""
    data = stream_data(stream)
    tasks: dict[str, dict[str, Any]] = {}
    differ = []
    for task in stream:
        tasks[task.name] = {}
        for split, examples in task.splits.items():
            key = f"{task.name}/{split}"
            expected = (protocol or {}).get(task.name, {}).get(split)
            count = len(examples)
            tasks[task.name][split] = {
                "file": str(stream.files[key]),
                "sha256": data["files"][key],
                "examples": count,
                "labels": label_counts([e.answer for e in examples]),
                "published": expected,
            }
            if expected is not None and expected != count:
                differ.append(f"{key}: {count} examples, published {expected}")
    return {
        "manifest_sha256": data["manifest_sha256"],
        "files": data["files"],
        "tasks": tasks,
        "protocol": bool(protocol),
        "differ_from_protocol": differ,
    }


def render(manifest: dict[str, Any]) -> str:
    """The manifest as the lines ``runners.data check`` prints."""
    lines = [f"{'task/split':<44} {'examples':>8} {'published':>9}  sha256        labels"]
    for task, splits in manifest["tasks"].items():
        for split, info in splits.items():
            published = "-" if info["published"] is None else str(info["published"])
            mark = " " if info["published"] in (None, info["examples"]) else "!"
            labels = ", ".join(f"{k!r} {v}" for k, v in (info["labels"] or {}).items())
            lines.append(
                f"{task + '/' + split:<44} {info['examples']:>8} {published:>9}{mark} {info['sha256'][:12]}  {labels}"
            )
    others = {k: v for k, v in manifest["files"].items() if k.rsplit("/", 1)[-1] not in ("train", "eval", "test")}
    lines += [f"{key:<64} {sha[:12]}" for key, sha in others.items()]
    lines.append(f"manifest sha256: {manifest['manifest_sha256']}")
    if not manifest["protocol"]:
        lines.append("no published protocol for this stream: the counts are shown, not compared")
    elif manifest["differ_from_protocol"]:
        lines.append(f"{len(manifest['differ_from_protocol'])} count(s) differ from the published protocol (marked !)")
    else:
        lines.append("every count matches the published protocol")
    return "\n".join(lines)
