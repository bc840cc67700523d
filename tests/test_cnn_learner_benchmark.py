"""benchmarks/cnn_learner.py runs as shipped: each side timed, the overhead and its interval
written (tiny sizes: this checks the script, not the speed; the figures are in benchmarks/README.md)."""

import json
import sys
from pathlib import Path

from tests.helpers import run_in_own_group

ROOT = Path(__file__).resolve().parents[1]


def test_the_cnn_learner_benchmark_runs_and_writes_its_table(tmp_path):
    code, out, err = run_in_own_group(
        [sys.executable, "-m", "benchmarks.cnn_learner", "--devices", "cpu", "--network", "ci",
         "--batch-size", "32", "--updates-per-call", "2", "--calls", "3", "--results", str(tmp_path)],
        timeout=600, cwd=ROOT,
    )
    assert code == 0, err[-3000:]
    (row,) = json.loads((tmp_path / "cnn_learner.json").read_text())["rows"]
    assert len(row["ours_calls"]) == len(row["plain_calls"]) == 3
    assert set(row["captured"]) == {"rllib_update", "eager_bf16"}
    low, high = row["overhead_ci95"]
    assert 0 < low <= row["overhead_ratio"] <= high
    assert "| cpu (" in (tmp_path / "cnn_learner.md").read_text()
