"""The comparison report's figures, drawn to be put in a paper: every axis says its unit and which
way is better, metrics go by their names, score matrices have a colour bar and their diagonal
(each task right after its own training) boxed, stages go by the task just trained, legends sit
beside the data, and every figure is written as PNG (for the HTML page) and PDF (for LaTeX) with a
caption the HTML page shows under it.

One set per setting (stream, task order, model): the mean score matrix of each method, the CL
metrics as bars with +-1 std error bars, each task's score across the stages (forgetting curves),
general ability before and after the stream, and the continual-evaluation curves when runs have them.
Names from the runs (tasks, methods, settings) are drawn as written (:func:`plain`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from cl_bench.recording.comparison import mean_curves, mean_matrix  # noqa: E402
from cl_bench.recording.run_results import CONTINUAL_METRICS, RunResult  # noqa: E402

SCORE = "score (0-100), higher is better"
POINTS_HIGHER = "points, higher is better"
#: the continual-evaluation metrics are in the unit of eval.continual.measure
CONTINUAL = "score (0-100) or answer log-lik. per token\n(eval.continual.measure), higher is better"
#: each bar metric's name and its axis (unit, better direction)
METRIC_AXES = {
    "op": ("OP: mean score after the last task", SCORE),
    "bwt": ("BWT: backward transfer", "points (< 0: forgetting), higher is better"),
    "fwt": ("FWT: forward transfer", POINTS_HIGHER),
    "forgetting": ("Forgetting: mean drop from the best score", "points, lower is better"),
    "delta_RG": (r"$\Delta R^G$: general ability, after - before", POINTS_HIGHER),
    "avg_min_acc": ("avg-min-ACC: mean worst value while seen", CONTINUAL),
    "wc_acc": ("WC-ACC: worst-case accuracy", CONTINUAL),
    "wf10": ("WF$^{10}$: worst forgetting in 10 evaluations", "drop in the continual measure,\nlower is better"),
}
BAR_METRICS = ("op", "bwt", "fwt", "forgetting", "delta_RG")
#: panels per row of a multi-panel figure (more wrap onto further rows, so a figure stays readable)
PANELS_PER_ROW = 4


def plain(text: str) -> str:
    """A name from a run, drawn as written: its ``$`` escaped, so that matplotlib does not take the
    text between two of them for a formula (an old run's task ``p$_$`` would fail to parse and
    take the whole report down with it)."""
    return str(text).replace("$", r"\$")


@dataclass
class Figure:
    """One figure of the report: its file stem, PNG and PDF bytes and the caption under it."""

    name: str
    png: bytes
    pdf: bytes
    caption: str


def stage_labels(tasks: list[str], rows: int, joint: bool = False) -> list[str]:
    """The stages of a score matrix by the task just trained: base, after <task>, ..."""
    trained = ["joint"] if joint else tasks
    return (["base"] + [f"after {t}" for t in trained])[:rows]


def draw_score_matrix(ax, R: list[list[float]], tasks: list[str], stages: list[str], title: str, joint: bool = False):
    """R as a heatmap on ``ax`` (0-100), each cell labelled with its score, the diagonal boxed
    (row "after t", column t: each task right after its own training); returns the image for a colour bar."""
    image = ax.imshow(R, vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(len(tasks)), [plain(t) for t in tasks], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(R)), [plain(s) for s in stages[: len(R)]], fontsize=7)
    ax.set_xlabel("task scored", fontsize=7)
    ax.set_ylabel("model after", fontsize=7)
    for i, row in enumerate(R):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6, color="white" if v < 60 else "black")
    for t in range(1, len(R) if not joint else 1):
        if t - 1 < len(tasks):
            ax.add_patch(Rectangle((t - 1.5, t - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.4))
    ax.set_title(plain(title), fontsize=8)
    return image


def score_matrix_png(R: list[list[float]], tasks: list[str], stages: list[str], title: str) -> bytes:
    """One run's score matrix as a PNG (the loggers' heatmap image)."""
    fig, ax = plt.subplots(figsize=(0.7 * len(tasks) + 3.2, 0.45 * len(R) + 2.2), layout="constrained")
    fig.colorbar(draw_score_matrix(ax, R, tasks, stages, title), ax=ax, label="score (0-100)")
    return render(fig)[0]


def figures(groups: dict[tuple, list[RunResult]], rows: list[dict], settings: list[tuple]) -> list[Figure]:
    """Every figure of the report, setting by setting (``settings``: (stream, order, model) tuples)."""
    out: list[Figure] = []
    for k, setting in enumerate(settings):
        mine = {key[0]: runs for key, runs in groups.items() if key[1:] == setting}
        stats = {r["method"]: r for r in rows if (r["stream"], tuple(r["order"]), r["model"]) == setting}
        labels, tasks, where = list(mine), list(setting[1]), f"Setting {k + 1}: {setting[2]} on {setting[0]}"
        names = [plain(label) for label in labels]

        def add(kind: str, fig, caption: str, k: int = k, where: str = where) -> None:
            out.append(Figure(f"setting{k + 1}_{kind}", *render(fig), f"{caption} {where}."))

        fig, axes = _grid(len(labels), 3.4, 3.6)
        for ax, label in zip(axes, labels):
            R, joint = mean_matrix(mine[label]), mine[label][0].joint
            image = draw_score_matrix(ax, R, tasks, stage_labels(tasks, len(R), joint), label, joint)
        fig.colorbar(image, ax=axes, label="score (0-100)", shrink=0.8)
        add(
            "score_matrices",
            fig,
            "Mean score matrix R over seeds, one panel per method: row 'after t' holds every "
            "task's score after training task t; boxed: each task right after its own training.",
        )

        shown = [m for m in (*BAR_METRICS, *CONTINUAL_METRICS) if any(s[m]["n"] for s in stats.values())]
        fig, axes = _grid(len(shown), 3.2, 3.3)
        for ax, m in zip(axes, shown):
            ax.bar(
                range(len(labels)),
                [stats[lab][m]["mean"] or 0 for lab in labels],
                yerr=[stats[lab][m]["std"] or 0 for lab in labels],
                capsize=3,
                color=plt.cm.tab10.colors[: len(labels)],
            )
            ax.set_xticks(range(len(labels)), names, rotation=45, ha="right", fontsize=7)
            ax.set_title(METRIC_AXES[m][0], fontsize=8)
            ax.set_ylabel(METRIC_AXES[m][1], fontsize=7)
            ax.axhline(0, color="black", linewidth=0.6)
        add("cl_metrics", fig, "CL metrics, mean ± std over seeds (error bars); each axis says which way is better.")

        fig, axes = _grid(len(labels), 3.4, 3.2, sharey=True)
        for ax, label in zip(axes, labels):
            R = mean_matrix(mine[label])
            for j, task in enumerate(tasks):
                ax.plot(range(len(R)), [row[j] for row in R], marker="o", markersize=3, label=plain(task))
            stages = [plain(s) for s in stage_labels(tasks, len(R), mine[label][0].joint)]
            ax.set_xticks(range(len(R)), stages, rotation=45, ha="right", fontsize=6)
            ax.set_title(plain(label), fontsize=8)
            ax.set_xlabel("model after", fontsize=7)
        axes[0].set_ylabel(SCORE, fontsize=7)
        _legend_beside(axes[-1], "task")
        add(
            "task_curves",
            fig,
            "Each task's mean score after every stage (forgetting curves): a line that falls "
            "after its own task's stage is forgetting.",
        )

        if any(stats[lab]["general_before"]["n"] for lab in labels):
            fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 4, 3.4), layout="constrained")
            for off, key, name in ((-0.2, "general_before", "before the stream"), (0.2, "general_after", "after it")):
                ax.bar(
                    [i + off for i in range(len(labels))],
                    [stats[lab][key]["mean"] or 0 for lab in labels],
                    width=0.4,
                    yerr=[stats[lab][key]["std"] or 0 for lab in labels],
                    capsize=3,
                    label=name,
                )
            ax.set_xticks(range(len(labels)), names, rotation=45, ha="right", fontsize=7)
            ax.set_ylabel("mean benchmark score (0-100),\nhigher is better", fontsize=7)
            ax.set_title("General ability before and after the stream", fontsize=9)
            _legend_beside(ax, "general ability")
            add(
                "general_ability",
                fig,
                "General ability (the mean over the general.tasks benchmarks) before and "
                "after the stream, mean ± std over seeds.",
            )

        curves = {label: c for label in labels if (c := mean_curves(mine[label])) is not None}
        if curves:
            add(
                "continual",
                continual_figure(curves, tasks),
                "Continual evaluation: each seen task's score during "
                "training against the stream step, mean over seeds (dotted: a task ends; a dip right after one is "
                "the stability gap).",
            )
    return out


def continual_figure(curves: dict[str, dict], tasks: list[str]):
    """Per method, each task's continual-evaluation score (mean over seeds) against the stream
    step; dotted lines where a task's training ends."""
    fig, axes = _grid(len(curves), 3.6, 3.2, sharey=True)
    for ax, (label, c) in zip(axes, curves.items()):
        for j, task in enumerate(tasks):
            pts = [(s, v) for s, v in zip(c["steps"], c["scores"].get(task, [])) if v is not None]
            if pts:
                ax.plot(
                    *zip(*pts), marker=".", markersize=3, linewidth=1, color=plt.cm.tab10(j % 10), label=plain(task)
                )
        for a, b, step in zip(c["training"], c["training"][1:], c["steps"]):
            if b != a:
                ax.axvline(step, color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(f"{plain(label)} (n={c['n']})", fontsize=8)
        ax.set_xlabel("stream step (optimizer steps)", fontsize=7)
        ax.tick_params(labelsize=6)
    measures = sorted({m for c in curves.values() for m in c["measures"].values()})
    axes[0].set_ylabel(
        " / ".join("answer log-likelihood per token" if m == "loglik" else "task score (0-100)" for m in measures)
        + ",\nhigher is better",
        fontsize=7,
    )
    _legend_beside(axes[-1], "task")
    return fig


def _legend_beside(ax, title: str) -> None:
    """The legend right of ``ax``, outside the plotting area: it covers no data."""
    ax.legend(fontsize=6, title=title, title_fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)


def _grid(count: int, width: float, height: float, **kwargs):
    """A figure of ``count`` panels of ``width`` x ``height`` inches, at most :data:`PANELS_PER_ROW`
    a row; returns it with the used axes in reading order (the unused ones hidden)."""
    cols = min(count, PANELS_PER_ROW)
    rows = -(-count // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(width * cols + 1, height * rows), squeeze=False, layout="constrained", **kwargs
    )
    flat = [ax for row in axes for ax in row]
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def render(fig) -> tuple[bytes, bytes]:
    """The figure as PNG and PDF bytes (the whole drawing, legends beside the axes included), then closed."""
    out = []
    for fmt in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(
            buf, format=fmt, dpi=110, bbox_inches="tight", metadata={"CreationDate": None} if fmt == "pdf" else None
        )
        out.append(buf.getvalue())
    plt.close(fig)
    return out[0], out[1]
