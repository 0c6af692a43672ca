"""The comparison report of many runs: report.md, report.html (figures embedded), summary.csv,
summary.json and PNG figures, from results.json files alone (cl_bench/recording/comparison.py).

Figures, one set per setting (stream, task order, model): the mean score matrix of each method,
the CL metrics as bars with +-1 std error bars, each task's score across the stages (forgetting
curves), and general ability before and after the stream.
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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cl_bench.files import atomic_write  # noqa: E402
from cl_bench.recording.comparison import (CONTINUAL_METRICS, METRICS, TIMINGS, RunResult,  # noqa: E402
                                           aggregate, group_runs, mean_curves, mean_matrix, paired,
                                           separating_keys)

BAR_METRICS = ("op", "bwt", "fwt", "forgetting", "delta_RG")


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
    """The metrics of the tables: all, less the continual-evaluation ones no run of ``rows`` has."""
    return [m for m in METRICS if m not in (*CONTINUAL_METRICS, "cpu_min") or any(r[m]["n"] for r in rows)]


def markdown(rows: list[dict], pairs: list[dict], failed: list[RunResult]) -> str:
    out = ["# Comparison report", ""]
    for k, (stream, order, model) in enumerate(_settings(rows)):
        mine = [r for r in rows if (r["stream"], tuple(r["order"]), r["model"]) == (stream, order, model)]
        metrics = _shown(mine)
        out += [f"## Setting {k + 1}: {model} on {stream}", "", f"Task order: {' -> '.join(order)}", "",
                "| method | seeds | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
        out += [f"| {_cell(r['method'])} | {','.join(map(str, r['seeds']))} | " + " | ".join(_fmt(r[m]) for m in metrics)
                + " |" for r in mine]
        mine_pairs = [p for p in pairs if (p["stream"], tuple(p["order"]), p["model"]) == (stream, order, model)]
        shown = [m for m in metrics if m not in TIMINGS]
        for baseline in dict.fromkeys(p["baseline"] for p in mine_pairs):
            out += ["", f"Paired with {baseline} over the seeds both ran: mean difference (method - {baseline}) "
                    "[bootstrap 95% interval]", "", "| method | seeds | " + " | ".join(shown) + " |",
                    "|---|---|" + "---|" * len(shown)]
            out += [f"| {_cell(p['method'])} | {','.join(map(str, p['seeds']))} | " + " | ".join(_fmt_pair(p[m]) for m in shown)
                    + " |" for p in mine_pairs if p["baseline"] == baseline]
            unpaired = [f"{name} ran seeds {','.join(map(str, seeds))} that the other did not ({p['method']} vs {baseline})"
                        for p in mine_pairs if p["baseline"] == baseline
                        for name, seeds in p["unpaired_seeds"].items() if seeds]
            if unpaired:
                out += ["", "Not paired, so not in the differences above: " + "; ".join(unpaired) + "."]
        out += ["", "Runs in each row:", "", "| method | runs |", "|---|---|"]
        out += [f"| {_cell(r['method'])} | {_cell(' '.join(r['runs']))} |" for r in mine]
        out.append("")
    if failed:
        out += ["## Runs that did not finish", "", "| run | status | error |", "|---|---|---|"]
        out += [f"| {r.path} | {r.status} | {' '.join((r.error or '').replace('|', '/').split())} |" for r in failed]
    return "\n".join(out) + "\n"


def draw_score_matrix(ax, R: list[list[float]], tasks: list[str], stages: list[str], title: str) -> None:
    """R as a heatmap on ``ax`` (0-100), each cell labelled with its score."""
    ax.imshow(R, vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(R)), stages[: len(R)], fontsize=7)
    for i, row in enumerate(R):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6, color="white" if v < 60 else "black")
    ax.set_title(title, fontsize=8)


def score_matrix_png(R: list[list[float]], tasks: list[str], stages: list[str], title: str) -> bytes:
    """One run's score matrix as a PNG (the W&B heatmap image)."""
    fig, ax = plt.subplots(figsize=(0.7 * len(tasks) + 2.5, 0.45 * len(R) + 2))
    draw_score_matrix(ax, R, tasks, stages, title)
    return _png(fig)


def figures(groups: dict[tuple, list[RunResult]], rows: list[dict]) -> dict[str, bytes]:
    """PNG bytes by file name."""
    pngs: dict[str, bytes] = {}
    for k, setting in enumerate(_settings(rows)):
        mine = {key[0]: runs for key, runs in groups.items() if key[1:] == setting}
        stats = {r["method"]: r for r in rows if (r["stream"], tuple(r["order"]), r["model"]) == setting}
        labels = list(mine)
        tasks = list(setting[1])
        n = len(labels)
        fig, axes = _grid(n, 3.2, 3.4)
        for ax, label in zip(axes, labels):
            R = mean_matrix(mine[label])
            trained = ["joint"] if len(R) == 2 and len(tasks) > 1 and mine[label][0].joint else tasks
            draw_score_matrix(ax, R, tasks, ["base"] + [f"after {t}" for t in trained][: len(R) - 1], label)
        fig.suptitle("Mean score matrix R (rows: after training, columns: task scored)", fontsize=9)
        pngs[f"setting{k + 1}_score_matrices.png"] = _png(fig)

        bars = [m for m in _shown(list(stats.values())) if m in BAR_METRICS or m in CONTINUAL_METRICS]
        fig, axes = _grid(len(bars), 3, 3.2)
        for ax, m in zip(axes, bars):
            means = [stats[lab][m]["mean"] or 0 for lab in labels]
            errs = [stats[lab][m]["std"] or 0 for lab in labels]
            ax.bar(range(n), means, yerr=errs, capsize=3, color=plt.cm.tab10.colors[: n])
            ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=7)
            ax.set_title(m, fontsize=9)
            ax.axhline(0, color="black", linewidth=0.6)
        fig.suptitle("CL metrics, mean ± std over seeds", fontsize=9)
        pngs[f"setting{k + 1}_cl_metrics.png"] = _png(fig)

        fig, axes = _grid(n, 3.2, 3, sharey=True)
        for ax, label in zip(axes, labels):
            R = mean_matrix(mine[label])
            for j, task in enumerate(tasks):
                ax.plot(range(len(R)), [row[j] for row in R], marker="o", markersize=3, label=task)
            ax.set_title(label, fontsize=8)
            ax.set_xlabel("stage (0 = untrained)", fontsize=7)
            ax.set_ylabel("score", fontsize=7)
        axes[-1].legend(fontsize=6, loc="best")
        fig.suptitle("Each task's score across the stages", fontsize=9)
        pngs[f"setting{k + 1}_task_curves.png"] = _png(fig)

        if any(stats[lab]["general_before"]["n"] for lab in labels):
            fig, ax = plt.subplots(figsize=(1.2 * n + 3, 3.4))
            for off, key in ((-0.2, "general_before"), (0.2, "general_after")):
                ax.bar([i + off for i in range(n)], [stats[lab][key]["mean"] or 0 for lab in labels], width=0.4,
                       yerr=[stats[lab][key]["std"] or 0 for lab in labels], capsize=3,
                       label="before" if "before" in key else "after")
            ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=7)
            ax.set_title("General ability before and after the stream", fontsize=9)
            ax.legend(fontsize=7)
            pngs[f"setting{k + 1}_general_ability.png"] = _png(fig)

        curves = {label: c for label in labels if (c := mean_curves(mine[label])) is not None}
        if curves:
            pngs[f"setting{k + 1}_continual.png"] = continual_figure(curves, tasks)
    return pngs


def continual_figure(curves: dict[str, dict], tasks: list[str]) -> bytes:
    """Per method, each task's continual-evaluation score (mean over seeds) against the stream
    step; dotted lines where a task's training ends. The stability gap is the dip right after one."""
    n = len(curves)
    fig, axes = _grid(n, 3.4, 3.1, sharey=True)
    for ax, (label, c) in zip(axes, curves.items()):
        for j, task in enumerate(tasks):
            pts = [(s, v) for s, v in zip(c["steps"], c["scores"].get(task, [])) if v is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", markersize=3, linewidth=1, color=plt.cm.tab10(j % 10), label=task)
        for a, b, step in zip(c["training"], c["training"][1:], c["steps"]):
            if b != a:
                ax.axvline(step, color="grey", linestyle=":", linewidth=0.8)
        measures = sorted(set(c["measures"].values()))
        ax.set_title(f"{label} (n={c['n']})", fontsize=8)
        ax.set_xlabel("stream step", fontsize=7)
        ax.set_ylabel(" / ".join("answer log-likelihood per token" if m == "loglik" else "task metric"
                                 for m in measures), fontsize=7)
        ax.tick_params(labelsize=6)
    axes[-1].legend(fontsize=6, loc="best")
    fig.suptitle("Continual evaluation: the seen tasks during training (dotted: a task ends)", fontsize=9)
    return _png(fig)


#: panels per row of a multi-panel figure (more wrap onto further rows, so a figure stays readable)
PANELS_PER_ROW = 4


def _grid(count: int, width: float, height: float, **kwargs):
    """A figure of ``count`` panels of ``width`` x ``height`` inches, at most :data:`PANELS_PER_ROW`
    a row; returns it with the used axes in reading order (the unused ones hidden)."""
    cols = min(count, PANELS_PER_ROW)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols + 1, height * rows), squeeze=False, **kwargs)
    flat = [ax for row in axes for ax in row]
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _cell(text: Any) -> str:
    """A Markdown table cell: a ``|`` in a setting or a path escaped, so it cannot split the row."""
    return str(text).replace("|", "\\|")


def _html_table(lines: list[str]) -> str:
    cells = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
             for line in lines if not set(line) <= set("|-")]
    head, body = cells[0], cells[1:]
    return ("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body) + "</table>")


def html_page(md_text: str, pngs: dict[str, bytes]) -> str:
    """One self-contained page: the report's headings, text and tables, and every figure inline."""
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
    for name, data in pngs.items():
        body.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
                    f'{base64.b64encode(data).decode()}"><figcaption>{html.escape(name)}</figcaption></figure>')
    style = ("body{font-family:sans-serif;max-width:1500px;margin:1.5em auto;padding:0 1em} "
             "table{border-collapse:collapse;font-size:13px;margin:0.5em 0} th,td{border:1px solid #bbb;padding:3px 7px;"
             "text-align:right} th{background:#eee} td:first-child,th:first-child{text-align:left} img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Comparison report</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")


def write_report(runs: list[RunResult], out_dir: str | Path, baseline: str | list[str] = "sft", seed: int = 0,
                 ) -> dict[str, Any]:
    """Write every output into ``out_dir``; returns the summary (also summary.json). ``baseline``:
    the method (or methods) the others are paired with, one table each."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    rows = aggregate(groups)
    pairs = [p for b in ([baseline] if isinstance(baseline, str) else baseline) for p in paired(groups, b, seed)]
    failed = [r for r in runs if r.status != "finished"]
    md_text = markdown(rows, pairs, failed)
    pngs = figures(groups, rows) if rows else {}
    summary = {"groups": rows, "paired": pairs,
               "separating_keys": separating_keys([r for r in runs if r.status == "finished"]),
               "failed": [{"path": str(r.path), "status": r.status, "error": r.error} for r in failed]}
    atomic_write(out / "report.md", md_text)
    atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "stream", "order", "model", "seeds"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "std", "n")])
    for r in rows:
        writer.writerow([r["method"], r["stream"], " ".join(r["order"]), r["model"], " ".join(map(str, r["seeds"]))]
                        + [r[m][s] for m in METRICS for s in ("mean", "std", "n")])
    atomic_write(out / "summary.csv", buf.getvalue())
    for name, data in pngs.items():
        atomic_write(out / name, data)
    atomic_write(out / "report.html", html_page(md_text, pngs))
    return summary
