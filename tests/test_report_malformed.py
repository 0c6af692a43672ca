"""Malformed results.json files do not take the report down: each is refused by name with its
reason, listed under "Not included", and the other runs are reported; NaN and infinities never
reach a JSON file the project writes (strict JSON); a refusal of the whole report is one line."""

import json
import math
import re

import pytest

from cl_bench.errors import ConfigError
from cl_bench.recording.reading import find_runs, read_run
from tests.launch import run_module
from tests.test_report import write_result

GOOD_R = [[0, 0], [80, 10], [40, 90]]


def strict(text: str):
    """``json.loads`` that refuses NaN and Infinity (not JSON), as strict readers do."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _set(path: str, value):
    def edit(record):
        *parents, last = path.split(".")
        node = record
        for key in parents:
            node = node[key]
        node[last] = value

    return edit


def _cell(i: int, j: int, value):
    def edit(record):
        record["R"][i][j] = value

    return edit


#: each malformed record the issue names: how it is made from a good one, and the reason it is refused for
MALFORMED = {
    "method_a_string": (_set("config.method", "ewc"), r"config.method is the string 'ewc', not a method's config"),
    "R_empty": (_set("R", []), r"the run finished, but R has 0 rows, not 3"),
    "R_missing": (lambda r: r.pop("R"), r"it has no R \(the score matrix\)"),
    "R_ragged": (_set("R", [[0, 0], [80], [40, 90]]), r"R\[1\] is a list of 1, not one score per task \(2\)"),
    "tasks_null": (_set("tasks", None), r"tasks is null, not a list of task names"),
    "a_row_too_many": (
        lambda r: r["R"].append([1, 2]),
        r"R has 4 rows; a run over 2 tasks has at most 3 \(the base row and one per stage\)",
    ),
    "a_string_cell": (_cell(2, 1, "90"), r"R\[2\]\[1\] is the string '90', not a score"),
    "a_nan_cell": (_cell(2, 0, math.nan), r"R\[2\]\[0\] is nan, not a finite score"),
    "an_infinite_cell": (_cell(1, 1, -math.inf), r"R\[1\]\[1\] is -inf, not a finite score"),
    "a_seed_that_is_no_integer": (_set("config.seed", "one"), r"config.seed is the string 'one', not an integer"),
}


def malformed(root, name: str, edit) -> str:
    """A run dir under ``root`` whose results.json is a good one edited by ``edit``; its file's path."""
    run = write_result(root, name, "ewc", 7, [row[:] for row in GOOD_R])
    record = json.loads((run / "results.json").read_text())
    edit(record)
    (run / "results.json").write_text(json.dumps(record))  # NaN and Infinity as Python writes them
    return str(run / "results.json")


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_results_file_is_refused_by_name_with_its_reason(tmp_path, case):
    edit, reason = MALFORMED[case]
    file = malformed(tmp_path, case, edit)
    with pytest.raises(ConfigError, match=f"^{file}: not a run's results.json \\({reason}"):
        read_run(tmp_path / case)


def test_a_folder_with_malformed_files_is_reported_without_them_and_names_each(tmp_path):
    """One CLI run over a sweep with every malformed file above, and an old run whose task names
    hold "$" (drawn as written, not as a formula): exit 0, the good runs reported, each bad file
    named with its reason on stderr, in report.md's "Not included" and in summary.json."""
    root = tmp_path / "runs"
    for seed in (1, 2):
        write_result(root, f"sft{seed}", "sft", seed, [[0, 0], [80, 10], [40 + seed, 90]])
        write_result(root, f"ewc{seed}", "ewc", seed, [[0, 0], [70, 10], [50 + seed, 80]])
    dollars = write_result(root, "old", "sft", 3, GOOD_R)
    record = json.loads((dollars / "results.json").read_text())
    record["tasks"] = ["p$_$", "q$\\x$"]
    (dollars / "results.json").write_text(json.dumps(record))
    files = {case: malformed(root / "bad", case, edit) for case, (edit, _) in MALFORMED.items()}
    proc = run_module("runners.report", str(root), "--out", str(tmp_path / "out"), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "5 runs, 3 groups, 0 not finished, 10 files refused" in proc.stdout
    assert "Traceback" not in proc.stderr
    md = (tmp_path / "out" / "report.md").read_text()
    summary = strict((tmp_path / "out" / "summary.json").read_text())
    assert sorted(g["method"] for g in summary["groups"]) == ["ewc", "sft", "sft"]
    refused = {r["path"]: r["reason"] for r in summary["refused"]}
    assert set(refused) == set(files.values())
    not_included = md[md.index("## Not included") :]
    for case, file in files.items():
        reason = MALFORMED[case][1]
        assert re.search(f"^not a run's results.json \\({reason}", refused[file]), (case, refused[file])
        assert f"refused: {file}: {refused[file]}" in proc.stderr
        line = next(line for line in not_included.splitlines() if line.startswith(f"| {file} | refused | "))
        assert re.search(reason, line), (case, line)
    assert "q$\\x$" in md and (tmp_path / "out" / "setting2_score_matrices.png").is_file()


def test_names_with_dollars_are_drawn_as_written_not_parsed_as_formulas():
    """An old run's task "p$_$" made matplotlib parse "_" as a formula and fail, and the report with it."""
    import matplotlib.pyplot as plt

    from cl_bench.recording.figures import draw_score_matrix, stage_labels

    tasks = ["p$_$", "q$\\x$"]
    fig, ax = plt.subplots()
    draw_score_matrix(ax, GOOD_R, tasks, stage_labels(tasks, 3), "sft [note=$a$]")
    fig.canvas.draw()
    shown = [t._preprocess_math(t.get_text())[0] for t in ax.get_xticklabels()]  # what is drawn
    assert shown == tasks
    plt.close(fig)


def test_the_same_seed_twice_is_one_line_and_exit_status_2(tmp_path):
    write_result(tmp_path, "a", "sft", 1, GOOD_R)
    write_result(tmp_path, "b", "sft", 1, GOOD_R, config_extra={"run_name": "again"})
    proc = run_module("runners.report", str(tmp_path), "--out", str(tmp_path / "out"), timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'a'} and {tmp_path / 'b'}: two runs of the same settings and seed 1 (sft); "
        "a report averages repeats over seeds: leave one of them out"
    ]


def test_no_readable_run_writes_the_report_of_refusals_and_exits_2(tmp_path):
    file = malformed(tmp_path / "runs", "only", _set("tasks", None))
    proc = run_module("runners.report", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: no readable run: all 1 results.json files were refused" in proc.stderr
    assert (
        f"| {file} | refused | not a run's results.json (tasks is null" in (tmp_path / "out" / "report.md").read_text()
    )


def test_non_finite_values_outside_R_are_read_as_missing_named_and_summary_json_is_strict(tmp_path):
    from cl_bench.recording.report import write_report

    for seed in (1, 2):
        write_result(tmp_path / "runs", f"sft{seed}", "sft", seed, GOOD_R, delta=-2.0)
    run = write_result(tmp_path / "runs", "ewc1", "ewc", 1, GOOD_R, delta=math.nan)
    record = json.loads((run / "results.json").read_text())
    record["timings"]["total_s"] = math.inf
    (run / "results.json").write_text(json.dumps(record))
    summary = write_report(find_runs([tmp_path / "runs"]), tmp_path / "out")
    stored = strict((tmp_path / "out" / "summary.json").read_text())  # no bare NaN or Infinity
    rows = {g["method"]: g for g in stored["groups"]}
    assert rows["ewc"]["delta_RG"] == {"mean": None, "std": None, "n": 0} and rows["ewc"]["wall_min"]["n"] == 0
    found = {"general.delta_RG": "nan", "general.mean.after_b": "nan", "timings.total_s": "inf"}
    assert stored["non_finite"] == {str(run): found}
    assert summary["paired"][0]["delta_RG"] is None
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"| {run} | general.delta_RG: nan, general.mean.after_b: nan, timings.total_s: inf |" in md


def test_a_run_recorder_writes_strict_json_and_says_where_values_were_not_finite(tmp_path):
    """A NaN score (a broken scorer) is written as null with where and what it was; the report
    then refuses the run for it, saying so, rather than reading a null as a score."""
    from cl_bench.recording.results import RunRecorder

    recorder = RunRecorder(tmp_path / "run", {"seed": 1, "method": {"_target_": "methods.sft.X"}}, ["a"], ["acc"])
    recorder.add_row([0.0], 0.0)
    recorder.add_row([math.nan], 0.0)
    recorder.write(status="finished")
    record = strict((tmp_path / "run" / "results.json").read_text())
    assert record["R"] == [[0.0], [None]] and record["cl_metrics"]["op"] is None
    assert record["non_finite"] == {"R[1][0]": "nan", "cl_metrics.op": "nan", "cl_metrics.mean_op": "nan"}
    assert list(record)[:3] == ["status", "error", "non_finite"]
    with pytest.raises(ConfigError, match=r"R\[1\]\[0\] is null: it was nan when the run recorded it"):
        read_run(tmp_path / "run")
