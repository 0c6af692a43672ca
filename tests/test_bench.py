"""The overhead benchmark runs (its numbers are recorded in docs/benchmarks.md, not asserted)."""
import json
import subprocess
import sys

from tests.conftest import ROOT


def test_bench_runs_both_paths_on_identical_steps(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "runners.bench", "model=tiny_llama", "bench.steps=4", "bench.warmup=1",
         "bench.repeats=2", "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert len(result["all"]["bare"]) == len(result["all"]["lightning"]) == 2
    assert result["ratio"] == result["lightning_s_per_step"] / result["bare_s_per_step"] > 0
    assert "lightning / bare" in proc.stdout
