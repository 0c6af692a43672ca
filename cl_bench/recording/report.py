"""The comparison report of many runs: report.md, report.html (figures embedded, each with its
caption), summary.csv, summary.json and the figures as PNG and PDF (cl_bench/recording/figures.py),
from results.json files alone (cl_bench/recording/comparison.py).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
from pathlib import Path
from typing import Any

from cl_bench.files import atomic_write
from cl_bench.recording.comparison import (
    CONTINUAL_METRICS,
    EXAMPLE_METRICS,
    KL_METRICS,
    METRICS,
    TIMINGS,
    RunResult,
    aggregate,
    different_data,
    group_runs,
    paired,
    separating_keys,
)
from cl_bench.recording.figures import Figure, figures


def _fmt(stat: dict | None) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    return f"{stat['mean']:.1f}" + (f" ± {stat['std']:.1f}" if stat["std"] is not None else "") + f" (n={stat['n']})"


def _fmt_pair(stat: dict | None) -> str:
    if not stat:
        return "-"
    ci = stat["ci95"]
    return f"{stat['diff']:+.1f}" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "") + f" (n={stat['n']})"


def _settings(rows: list[dict]) -> list[tuple]:
    return list(dict.fromkeys((r["stream"], tuple(r["order"]), r["model"]) for r in rows))


def _shown(rows: list[dict]) -> list[str]:
    """The metrics of the tables: all, less the optional ones (continual evaluation, per-example
    flips, CPU time) that no run of ``rows`` has."""
    optional = (*CONTINUAL_METRICS, *EXAMPLE_METRICS, *KL_METRICS, "cpu_min")
    return [m for m in METRICS if m not in optional or any(r[m]["n"] for r in rows)]


def markdown(rows: list[dict], pairs: list[dict], failed: list[RunResult], data_notes: list[str] = ()) -> str:
    out = ["# Comparison report", ""]
    if data_notes:
        out += ["Runs on different data (their manifests differ) are in different settings:", ""]
        out += [f"- {note}" for note in data_notes] + [""]
    for k, (stream, order, model) in enumerate(_settings(rows)):
        mine = [r for r in rows if (r["stream"], tuple(r["order"]), r["model"]) == (stream, order, model)]
        metrics = _shown(mine)
        out += [
            f"## Setting {k + 1}: {model} on {stream}",
            "",
            f"Task order: {' -> '.join(order)}",
            "",
            "| method | seeds | " + " | ".join(metrics) + " |",
            "|---|---|" + "---|" * len(metrics),
        ]
        out += [
            f"| {_cell(r['method'])} | {','.join(map(str, r['seeds']))} | "
            + " | ".join(_fmt(r[m]) for m in metrics)
            + " |"
            for r in mine
        ]
        mine_pairs = [p for p in pairs if (p["stream"], tuple(p["order"]), p["model"]) == (stream, order, model)]
        shown = [m for m in metrics if m not in TIMINGS]
        for baseline in dict.fromkeys(p["baseline"] for p in mine_pairs):
            out += [
                "",
                f"Paired with {baseline} over the seeds both ran: mean difference (method - {baseline}) "
                "[bootstrap 95% interval]",
                "",
                "| method | seeds | " + " | ".join(shown) + " |",
                "|---|---|" + "---|" * len(shown),
            ]
            out += [
                f"| {_cell(p['method'])} | {','.join(map(str, p['seeds']))} | "
                + " | ".join(_fmt_pair(p[m]) for m in shown)
                + " |"
                for p in mine_pairs
                if p["baseline"] == baseline
            ]
            unpaired = [
                f"{name} ran seeds {','.join(map(str, seeds))} that the other did not ({p['method']} vs {baseline})"
                for p in mine_pairs
                if p["baseline"] == baseline
                for name, seeds in p["unpaired_seeds"].items()
                if seeds
            ]
            if unpaired:
                out += ["", "Not paired, so not in the differences above: " + "; ".join(unpaired) + "."]
        out += ["", "Runs in each row:", "", "| method | runs |", "|---|---|"]
        out += [f"| {_cell(r['method'])} | {_cell(' '.join(r['runs']))} |" for r in mine]
        out.append("")
    if failed:
        out += ["## Runs that did not finish", "", "| run | status | error |", "|---|---|---|"]
        out += [f"| {r.path} | {r.status} | {' '.join((r.error or '').replace('|', '/').split())} |" for r in failed]
    return "\n".join(out) + "\n"


def _cell(text: Any) -> str:
    """A Markdown table cell: a ``|`` in a setting or a path escaped, so it cannot split the row."""
    return str(text).replace("|", "\\|")


def _html_table(lines: list[str]) -> str:
    cells = [
        [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        for line in lines
        if not set(line) <= set("|-")
    ]
    head, body = cells[0], cells[1:]
    return (
        "<table><tr>"
        + "".join(f"<th>{html.escape(c)}</th>" for c in head)
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
        + "</table>"
    )


def html_page(md_text: str, figs: list[Figure]) -> str:
    """One self-contained page: the report's headings, text and tables, and every figure inline
    with its caption."""
    body = []
    for block in md_text.split("\n\n"):
        lines = block.strip().splitlines()
        if not lines:
            continue
        if lines[0].startswith("#"):
            level = len(lines[0]) - len(lines[0].lstrip("#"))
            body.append(f"<h{level}>{html.escape(lines[0].lstrip('# '))}</h{level}>")
            lines = lines[1:]
        if lines and all(line.startswith("|") for line in lines):
            body.append(_html_table(lines))
        elif lines:
            body.append(f"<p>{html.escape(' '.join(lines))}</p>")
    for n, fig in enumerate(figs, 1):
        body.append(
            f'<figure><img alt="{html.escape(fig.name)}.png" src="data:image/png;base64,'
            f'{base64.b64encode(fig.png).decode()}"><figcaption><b>Figure {n}.</b> {html.escape(fig.caption)} '
            f"({html.escape(fig.name)}.png, .pdf)</figcaption></figure>"
        )
    style = (
        "body{font-family:sans-serif;max-width:1500px;margin:1.5em auto;padding:0 1em} "
        "table{border-collapse:collapse;font-size:13px;margin:0.5em 0} th,td{border:1px solid #bbb;padding:3px 7px;"
        "text-align:right} th{background:#eee} td:first-child,th:first-child{text-align:left} img{max-width:100%} "
        "figure{margin:1.5em 0} figcaption{font-size:14px;color:#333;max-width:1000px}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Comparison report</title><style>{style}</style>"
        f"</head><body>{''.join(body)}</body></html>\n"
    )


def write_report(
    runs: list[RunResult],
    out_dir: str | Path,
    baseline: str | list[str] = "sft",
    seed: int = 0,
) -> dict[str, Any]:
    """Write every output into ``out_dir``; returns the summary (also summary.json). ``baseline``:
    the method (or methods) the others are paired with, one table each."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    rows = aggregate(groups)
    pairs = [p for b in ([baseline] if isinstance(baseline, str) else baseline) for p in paired(groups, b, seed)]
    failed = [r for r in runs if r.status != "finished"]
    data_notes = different_data(runs)
    md_text = markdown(rows, pairs, failed, data_notes)
    figs = figures(groups, rows, _settings(rows)) if rows else []
    summary = {
        "groups": rows,
        "paired": pairs,
        "separating_keys": separating_keys([r for r in runs if r.status == "finished"]),
        "different_data": data_notes,
        "failed": [{"path": str(r.path), "status": r.status, "error": r.error} for r in failed],
    }
    atomic_write(out / "report.md", md_text)
    atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        ["method", "stream", "order", "model", "seeds"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "std", "n")]
    )
    for r in rows:
        writer.writerow(
            [r["method"], r["stream"], " ".join(r["order"]), r["model"], " ".join(map(str, r["seeds"]))]
            + [r[m][s] for m in METRICS for s in ("mean", "std", "n")]
        )
    atomic_write(out / "summary.csv", buf.getvalue())
    for fig in figs:
        atomic_write(out / f"{fig.name}.png", fig.png)
        atomic_write(out / f"{fig.name}.pdf", fig.pdf)
    atomic_write(out / "report.html", html_page(md_text, figs))
    return summary
