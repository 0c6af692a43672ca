"""The suite keeps to its time budget: a test that takes longer than it fails (tests/budget.py)."""


def test_a_test_over_the_time_budget_fails_naming_the_budget(pytester, monkeypatch):
    pytester.makepyfile(
        test_two="import time\n\ndef test_slow():\n    time.sleep(0.3)\n\ndef test_quick():\n    pass\n"
    )
    monkeypatch.setenv("CL_BENCH_TEST_BUDGET_S", "0.2")
    result = pytester.runpytest_inprocess("-p", "tests.budget", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_two.py::test_slow (call) took 0.* s, over the 0.2 s a test may take*"])
    monkeypatch.setenv("CL_BENCH_TEST_BUDGET_S", "5")
    pytester.runpytest_inprocess("-p", "tests.budget", "-p", "no:cacheprovider").assert_outcomes(passed=2)
