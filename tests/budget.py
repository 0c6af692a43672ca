"""The suite's time budget, enforced: a test that passes but takes longer than the budget (each of
its setup, call and teardown) fails, so that a new feature cannot quietly add minutes to the suite.
README.md's "Keeping the suite fast" says how to make a test cheaper.

The budget is 60 s, or CL_BENCH_TEST_BUDGET_S seconds.
"""

import os

import pytest

DEFAULT_BUDGET_S = 60.0


def budget_s() -> float:
    return float(os.environ.get("CL_BENCH_TEST_BUDGET_S", DEFAULT_BUDGET_S))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    budget = budget_s()
    if report.passed and call.duration > budget:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} ({call.when}) took {call.duration:.1f} s, over the {budget:g} s a test may take "
            "(CL_BENCH_TEST_BUDGET_S); README.md's 'Keeping the suite fast' says how to make it cheaper"
        )
    return report
