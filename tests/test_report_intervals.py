"""The report's paired intervals say what they are: Student's t below BOOTSTRAP_MIN_N pairs, the
percentile bootstrap from there on, none for one pair; a paired table names each row's interval
and warns when few seeds make it unreliable."""

import json
import math
import statistics

import pytest

from cl_bench.recording.comparison import group_runs, paired
from cl_bench.recording.intervals import BOOTSTRAP_MIN_N, bootstrap_interval, paired_interval, t_interval, t_quantile
from cl_bench.recording.reading import find_runs
from tests.test_report import sweep

#: t_{0.975, df} as statistics tables print it (3 decimals)
TABLE_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 19: 2.093, 28: 2.048, 29: 2.045}


def restated(diffs: list[float], t: float):
    """mean -+ t sd / sqrt(n), to the table's rounding of t (3 decimals)."""
    n, mean = len(diffs), statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n)
    return pytest.approx([mean - t * se, mean + t * se], abs=5e-4 * se)


def test_the_t_quantile_matches_the_printed_tables():
    for df, t in TABLE_975.items():
        assert t_quantile(0.975, df) == pytest.approx(t, abs=5e-4), df
    assert t_quantile(0.95, 4) == pytest.approx(2.132, abs=5e-4) and t_quantile(0.995, 2) == pytest.approx(
        9.925, abs=5e-4
    )


def test_the_t_quantile_and_interval_match_scipy_where_it_is_installed():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 60):
        assert t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9), df
    diffs = [1.0, -2.5, 4.0, 0.5]
    expected = stats.t.interval(0.95, len(diffs) - 1, loc=statistics.fmean(diffs), scale=stats.sem(diffs))
    assert t_interval(diffs) == pytest.approx(expected, rel=1e-9)


def test_two_pairs_get_a_t_interval_not_their_min_and_max_and_one_pair_gets_none():
    """The issue's row: ewc - sft op over 2 seeds, differences -1.8 and +1.2, printed before as
    -0.3 [-1.8, +1.2], the bootstrap of two values (their min and max) read as a 95% interval."""
    diffs = [-1.8, 1.2]
    kind, interval = paired_interval(diffs)
    assert kind == "t" and interval == restated(diffs, 12.706)
    assert interval[0] < -15 and interval[1] > 15  # about +-19: not [-1.8, +1.2]
    three = [2.0, -1.0, 5.0]
    assert paired_interval(three) == ("t", restated(three, 4.303))
    five = [2.0, -1.0, 5.0, 0.5, 1.0]
    assert paired_interval(five) == ("t", restated(five, 2.776))
    assert paired_interval([1.5]) == (None, None)


def test_the_bootstrap_is_kept_from_the_threshold_on():
    many = [float((7 * i) % 11) - 4 for i in range(BOOTSTRAP_MIN_N)]
    assert paired_interval(many, seed=5) == ("bootstrap", list(bootstrap_interval(many, 5)))
    fewer = many[:-1]
    assert paired_interval(fewer, seed=5) == ("t", restated(fewer, TABLE_975[len(fewer) - 1]))


def test_the_report_names_each_row_s_interval_and_warns_below_five_seeds(tmp_path):
    from cl_bench.recording.report import few_seeds_warning, write_report

    runs = find_runs([sweep(tmp_path / "runs")])
    summary = write_report(runs, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| method | seeds | interval | op ↑ |" in md and "| fggm | 1,2 | t 95% | " in md
    assert "Student's t below 30 paired seeds, percentile bootstrap from there on" in md
    warning = (
        "Warning: differences from fewer than 5 paired seeds: their intervals are wide and unreliable "
        "(they rest on so few seeds that the spread itself is barely measured; a t 95% interval spans the "
        "mean ± 12.7 standard errors at n = 2). Run more seeds before reading a difference as real."
    )
    assert warning in md.splitlines()
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<td>t 95%</td>" in page and "± 12.7 standard errors at n = 2" in page
    stored = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert stored == json.loads(json.dumps(summary))
    assert stored["paired"][0]["op"]["interval"] == "t"
    assert stored["warnings"] == [f"Setting 1, paired with sft: {warning}"]
    assert stored["intervals"]["kinds"]["t"].startswith("Student's t on the paired differences, from 2 to 29")
    # enough seeds: no warning
    pair = paired(group_runs(runs), "sft")[0]
    assert few_seeds_warning([{**pair, "op": {**pair["op"], "n": 5}}], ["op"]) is None
    assert "n = 1 has none" in few_seeds_warning([{**pair, "op": {**pair["op"], "n": 1}}], ["op"])
