"""The data path between sampling and learning fails without stopping anything: steps grow and
losses are logged while the learners train on old data, make fewer updates than owed, or the
runners sample with a policy that no longer changes. Each fault, injected into a real Pendulum
run once learning is under way, is caught by its named rule within 5 iterations; the same run
without it raises none of them."""

import pytest

from callbacks.alerts import read_alerts
from benchmarks.health_zoo import data_path_fault
from rl.config import load_config
from rl.train import train

FAULT_AFTER = 8  # iterations of 64 steps; learning starts at iteration 6 (learning_starts 320)
RULES = ("weights_stale", "replay_not_filling", "learner_behind")


def pendulum(tmp_path, iterations: int):
    return load_config("configs/pendulum_td3.yaml", [
        f"experiment.stop_env_steps={64 * iterations}", "algo.learning_starts=320", "evaluation.interval_iters=0",
        "evaluation.episodes=1", "wandb.enabled=false", f"experiment.output_dir={tmp_path}",
    ])


@pytest.mark.slow
@pytest.mark.parametrize("rule", RULES)
def test_a_data_path_fault_is_caught_by_its_rule_within_5_iterations(ray_local, tmp_path, rule):
    with data_path_fault(rule, at_step=64 * FAULT_AFTER):  # the faults of the failure zoo
        summary = train(pendulum(tmp_path, FAULT_AFTER + 6), run_dir=tmp_path / "run", show_progress=False)
    alerts = [a for a in read_alerts(tmp_path / "run") if a["rule"] == rule and a["level"] != "INFO"]
    assert alerts, read_alerts(tmp_path / "run")
    assert FAULT_AFTER < alerts[0]["iteration"] <= FAULT_AFTER + 5
    if alerts[0]["level"] == "CRITICAL":
        assert summary["status"] == "stopped_unhealthy" and rule in summary["stopped_by"]
    others = {a["rule"] for a in read_alerts(tmp_path / "run") if a["level"] != "INFO"} & set(RULES)
    assert others == {rule}


@pytest.mark.slow
def test_a_healthy_run_raises_none_of_the_data_path_rules(ray_local, tmp_path):
    train(pendulum(tmp_path, FAULT_AFTER + 6), run_dir=tmp_path / "run", show_progress=False)
    assert not [a for a in read_alerts(tmp_path / "run") if a["rule"] in RULES]
