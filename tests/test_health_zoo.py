"""The failure zoo's fast subset (benchmarks/health_zoo.py, `--ci`): real training runs that go
bad in three different ways, each caught by its named rule, stopped, and reported FAIL. The
healthy end-to-end runs (test_train_pendulum.py, test_train_driving.py) are the other half:
no CRITICAL alert, at most one WARN, report PASS."""

import pytest

from benchmarks.health_zoo import MAX_LATENCY, SCENARIOS, run_scenario


@pytest.mark.slow
@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s.ci], ids=lambda s: s.name)
def test_a_run_going_bad_is_caught_by_its_rule_within_a_few_iterations_and_stopped(ray_local, tmp_path, scenario):
    row = run_scenario(scenario, tmp_path)
    assert row["latency"] is not None and row["latency"] <= MAX_LATENCY, row
    assert row["critical"] >= 1 and row["report"] == "FAIL", row
    summary = (tmp_path / scenario.name / "summary.json").read_text()
    assert '"status": "stopped_unhealthy"' in summary, summary
