"""The Rich tables printed by the runner: the score matrix and the CL metrics."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def matrix_table(stages: list[str], task_names: list[str], metric_names: list[str], R: list[list[float]]) -> Table:
    table = Table(title="Scores R[t][i] (0-100): rows = after training task t, columns = task i")
    table.add_column("stage", style="bold")
    for name, metric in zip(task_names, metric_names):
        table.add_column(f"{name}\n({metric})", justify="right")
    for t, (stage, row) in enumerate(zip(stages, R)):
        cells = [f"[bold]{_fmt(v)}[/bold]" if i == t - 1 else _fmt(v) for i, v in enumerate(row)]
        table.add_row(stage, *cells)
    return table


def metrics_table(cl_metrics: dict[str, float | None]) -> Table:
    table = Table(title="Continual-learning metrics")
    for name in cl_metrics:
        table.add_column(name, justify="right")
    table.add_row(*[_fmt(v) for v in cl_metrics.values()])
    return table


def general_table(general: dict[str, dict[str, float]], means: dict[str, float | None], delta: float | None) -> Table:
    """General-ability scores by stage (rows) and benchmark (columns), their mean, and delta R^G."""
    benchmarks = list(next(iter(general.values())))
    table = Table(title="General ability (0-100)", caption=f"delta R^G = {_fmt(delta)}")
    table.add_column("stage", style="bold")
    for name in benchmarks:
        table.add_column(name, justify="right")
    table.add_column("mean", justify="right")
    for stage, scores in general.items():
        table.add_row(stage, *[_fmt(scores[b]) for b in benchmarks], _fmt(means.get(stage)))
    return table


def print_summary(recorder, console: Console | None = None) -> None:
    console = console or Console()
    console.print(matrix_table(recorder.stages, recorder.task_names, recorder.metric_names, recorder.R))
    if recorder.cl_metrics():
        console.print(metrics_table(recorder.cl_metrics()))
    if recorder.general:
        means = {stage: recorder.general_mean(stage) for stage in recorder.general}
        console.print(general_table(recorder.general, means, recorder.general_delta()))
