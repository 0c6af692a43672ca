"""The comparison report of many runs: report.md, report.html (figures embedded, each with its
caption), summary.csv, summary.json and the figures as PNG and PDF (cl_bench/recording/figures.py),
from results.json files alone (cl_bench/recording/reading.py, comparison.py).

A column that no row fills is left out; a paired table says which way each metric is better and
which interval each row carries, and warns where few seeds make the intervals unreliable. Files
that could not be read and runs that did not finish are listed, with why, under "Not included".
summary.json is strict JSON.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import re
from pathlib import Path
from typing import Any

from cl_bench.files import atomic_write
from cl_bench.recording.comparison import aggregate, group_runs, paired, separating_keys
from cl_bench.recording.figures import Figure, figures
from cl_bench.recording.intervals import BOOTSTRAP_MIN_N, FEW_SEEDS, INTERVAL_NAMES, LEVEL, t_quantile
from cl_bench.recording.reading import different_data
from cl_bench.recording.results import finite_json, strict_json
from cl_bench.recording.run_results import BETTER, METRICS, TIMINGS, Refused, RunResult

#: decimals a metric is printed with (others: 1): a mean reward (0-1 for the task's score) and a
#: share of skipped groups (0-1) need two
DECIMALS = {"reward": 2, "skipped_groups": 2}
#: how a paired table's header says which way a metric is better
ARROWS = {"higher": "↑", "lower": "↓"}
#: how the report names an interval's absence (one pair: no spread to measure)
NO_INTERVAL = "none (n=1)"


def _fmt(stat: dict | None, metric: str = "") -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    d = DECIMALS.get(metric, 1)
    return (
        f"{stat['mean']:.{d}f}" + (f" ± {stat['std']:.{d}f}" if stat["std"] is not None else "") + f" (n={stat['n']})"
    )


def _fmt_pair(stat: dict | None, metric: str = "") -> str:
    if not stat:
        return "-"
    d, ci = DECIMALS.get(metric, 1), stat["ci95"]
    return f"{stat['diff']:+.{d}f}" + (f" [{ci[0]:+.{d}f}, {ci[1]:+.{d}f}]" if ci else "") + f" (n={stat['n']})"


def _settings(rows: list[dict]) -> list[tuple]:
    return list(dict.fromkeys((r["stream"], tuple(r["order"]), r["model"]) for r in rows))


def _shown(rows: list[dict]) -> list[str]:
    """The metrics of a setting's table: those that some row of ``rows`` has (a column of "-" only,
    such as continual evaluation's in runs without it, or GRPO's reward beside SFT runs, is left out)."""
    return [m for m in METRICS if any(r[m]["n"] for r in rows)]


def _interval_column(pair: dict, metrics: list[str]) -> str:
    """Which interval a paired row carries (its metrics may differ in n: each kind once)."""
    kinds = dict.fromkeys(pair[m]["interval"] for m in metrics if pair[m])
    return " / ".join(INTERVAL_NAMES[k] if k else NO_INTERVAL for k in kinds) or "-"


def _in_setting(items: list[dict], setting: tuple) -> list[dict]:
    return [x for x in items if (x["stream"], tuple(x["order"]), x["model"]) == setting]


def paired_tables(rows: list[dict], pairs: list[dict], setting: tuple) -> list[tuple[str, list[dict], list[str]]]:
    """A setting's paired tables: per baseline, its rows and its metric columns (those some row
    fills; no timings: a cost is not paired)."""
    shown = [m for m in _shown(_in_setting(rows, setting)) if m not in TIMINGS]
    mine = _in_setting(pairs, setting)
    tables = []
    for baseline in dict.fromkeys(p["baseline"] for p in mine):
        these = [p for p in mine if p["baseline"] == baseline]
        tables.append((baseline, these, [m for m in shown if any(p[m] for p in these)]))
    return tables


def few_seeds_warnings(rows: list[dict], pairs: list[dict]) -> list[str]:
    """Every paired table's few-seeds warning (:func:`few_seeds_warning`), named by setting and
    baseline: summary.json's ``warnings``."""
    return [
        f"Setting {k + 1}, paired with {baseline}: {warning}"
        for k, setting in enumerate(_settings(rows))
        for baseline, these, shown in paired_tables(rows, pairs, setting)
        if (warning := few_seeds_warning(these, shown))
    ]


def few_seeds_warning(pairs: list[dict], metrics: list[str]) -> str | None:
    """The warning under a paired table whose differences rest on fewer than :data:`FEW_SEEDS`
    pairs, naming how wide a t interval is at the n the table has; None when every n is large enough."""
    few = sorted({p[m]["n"] for p in pairs for m in metrics if p[m] and p[m]["n"] < FEW_SEEDS})
    if not few:
        return None
    widths = [f"± {t_quantile(0.5 + LEVEL / 2, n - 1):.1f} standard errors at n = {n}" for n in few if n > 1]
    return (
        f"Warning: differences from fewer than {FEW_SEEDS} paired seeds: their intervals are wide and "
        "unreliable (they rest on so few seeds that the spread itself is barely measured"
        + (f"; a t 95% interval spans the mean {', '.join(widths)}" if widths else "")
        + ("; n = 1 has none" if 1 in few else "")
        + "). Run more seeds before reading a difference as real."
    )


def markdown(
    rows: list[dict],
    pairs: list[dict],
    failed: list[RunResult],
    data_notes: list[str] = (),
    refused: list[Refused] = (),
    non_finite: dict[str, dict[str, str]] | None = None,
    unlearned: dict[str, dict[str, str]] | None = None,
) -> str:
    """report.md: per setting the groups' table, a paired table per baseline, the runs of each
    row; then the tasks an on-policy run learned nothing on, the values read as missing and what
    was not included, and why."""
    out = ["# Comparison report", ""]
    if data_notes:
        out += ["Runs on different data (their manifests differ) are in different settings:", ""]
        out += [f"- {note}" for note in data_notes] + [""]
    for k, (stream, order, model) in enumerate(_settings(rows)):
        mine = _in_setting(rows, (stream, order, model))
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
            + " | ".join(_fmt(r[m], m) for m in metrics)
            + " |"
            for r in mine
        ]
        for baseline, these, shown in paired_tables(rows, pairs, (stream, order, model)):
            out += [
                "",
                f"Paired with {baseline} over the seeds both ran: mean difference (method - {baseline}) "
                f"[95% interval: Student's t below {BOOTSTRAP_MIN_N} paired seeds, percentile bootstrap "
                "from there on, none for one; the interval column says which each row carries]. "
                "↑: higher is better, ↓: lower is better.",
                "",
                "| method | seeds | interval | " + " | ".join(f"{m} {ARROWS[BETTER[m]]}" for m in shown) + " |",
                "|---|---|---|" + "---|" * len(shown),
            ]
            out += [
                f"| {_cell(p['method'])} | {','.join(map(str, p['seeds']))} | {_interval_column(p, shown)} | "
                + " | ".join(_fmt_pair(p[m], m) for m in shown)
                + " |"
                for p in these
            ]
            warning = few_seeds_warning(these, shown)
            if warning:
                out += ["", warning]
            unpaired = [
                f"{name} ran seeds {','.join(map(str, seeds))} that the other did not ({p['method']} vs {baseline})"
                for p in these
                for name, seeds in p["unpaired_seeds"].items()
                if seeds
            ]
            if unpaired:
                out += ["", "Not paired, so not in the differences above: " + "; ".join(unpaired) + "."]
        out += ["", "Runs in each row:", "", "| method | runs |", "|---|---|"]
        out += [f"| {_cell(r['method'])} | {_cell(' '.join(r['runs']))} |" for r in mine]
        out.append("")
    if unlearned:
        out += [
            "## Tasks learned from nothing",
            "",
            "On-policy runs (GRPO, self-SFT) whose rollouts of a task taught nothing: their scores on it are "
            "the untrained model's, not a method's retention:",
            "",
            "| run | task: why |",
            "|---|---|",
        ]
        out += [
            f"| {_cell(run)} | {_cell('; '.join(f'{t}: {why}' for t, why in tasks.items()))} |"
            for run, tasks in unlearned.items()
        ]
        out.append("")
    if non_finite:
        out += [
            "## Values read as missing",
            "",
            "Not finite numbers (NaN, infinity) in these runs' results.json, or written as null by the run "
            "for being so; the tables leave them out:",
            "",
            "| run | where: what |",
            "|---|---|",
        ]
        out += [f"| {_cell(run)} | {_cell(_places(found))} |" for run, found in non_finite.items()]
        out.append("")
    if failed or refused:
        out += ["## Not included", "", "| run | status | why |", "|---|---|---|"]
        out += [f"| {_cell(r.path)} | {r.status} | {_one_line(r.error)} |" for r in failed]
        out += [f"| {_cell(r.path)} | refused | {_one_line(r.reason)} |" for r in refused]
    return "\n".join(out) + "\n"


def _places(found: dict[str, str], most: int = 5) -> str:
    """The first ``most`` places of non-finite values, and how many more."""
    listed = [f"{where}: {what}" for where, what in list(found.items())[:most]]
    more = len(found) - most
    return ", ".join(listed) + (f" and {more} more" if more > 0 else "")


def _one_line(text: str | None) -> str:
    """An error or reason as one table cell: one line, its ``|`` made ``/``."""
    return " ".join((text or "").replace("|", "/").split())


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
    refused: list[Refused] = (),
) -> dict[str, Any]:
    """Write every output into ``out_dir``; returns the summary (also summary.json). ``baseline``:
    the method (or methods) the others are paired with, one table each; ``refused``: the files
    :func:`~cl_bench.recording.reading.find_runs` left out, listed with their reasons."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    rows = aggregate(groups)
    pairs = [p for b in ([baseline] if isinstance(baseline, str) else baseline) for p in paired(groups, b, seed)]
    failed = [r for r in runs if r.status != "finished"]
    data_notes = different_data(runs)
    non_finite = {str(r.path): r.non_finite for r in runs if r.status == "finished" and r.non_finite}
    unlearned = {str(r.path): r.unlearned for r in runs if r.status == "finished" and r.unlearned}
    md_text = markdown(rows, pairs, failed, data_notes, refused, non_finite, unlearned)
    figs = figures(groups, rows, _settings(rows)) if rows else []
    summary = {
        "groups": rows,
        "paired": pairs,
        "intervals": {
            "level": LEVEL,
            "kinds": {
                "t": f"Student's t on the paired differences, from 2 to {BOOTSTRAP_MIN_N - 1} pairs",
                "bootstrap": f"percentile bootstrap (10000 resamples, seed {seed}), from {BOOTSTRAP_MIN_N} pairs",
                "null": "one pair: no interval",
            },
            "few_seeds_below": FEW_SEEDS,
        },
        "better": BETTER,
        "warnings": few_seeds_warnings(rows, pairs),
        "separating_keys": separating_keys([r for r in runs if r.status == "finished"]),
        "different_data": data_notes,
        "failed": [{"path": str(r.path), "status": r.status, "error": r.error} for r in failed],
        "refused": [{"path": str(r.path), "reason": r.reason} for r in refused],
        "non_finite": non_finite,
        "unlearned": unlearned,
    }
    atomic_write(out / "report.md", md_text)
    record, not_finite = finite_json(summary)
    if not_finite:  # a mean that overflowed: written as null, and where it was said
        record["summary_non_finite"] = not_finite
    atomic_write(out / "summary.json", strict_json(record, indent=1))
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
