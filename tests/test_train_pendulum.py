"""End to end: `rl.train` learns Pendulum-v1 with TD3, as the reference implementations do."""

import json

import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.utils.metrics import LEARNER_RESULTS

from callbacks.alerts import read_alerts
from rl.config import load_config
from rl.experiment import build_td3_config
from rl.report import write_report
from rl.train import train


@pytest.mark.slow
def test_td3_reaches_minus_250_on_pendulum_within_20k_steps(ray_local, tmp_path):
    exp = load_config(
        "configs/pendulum_td3.yaml",
        [f"experiment.output_dir={tmp_path}", "experiment.stop_env_steps=20000"],
    )
    summary = train(exp, run_dir=tmp_path / "run", show_progress=False)

    assert summary["env_steps"] <= 20_000 + exp.resources.rollout_fragment_length
    assert summary["final_eval_return_mean"] >= -250.0, summary

    # The run directory holds what the README promises, under the stable metric names.
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "final").is_dir()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    learning = [r for r in rows if r["env/steps_sampled"] > exp.algo.learning_starts]
    assert learning, "no iteration after learning_starts"
    for row in learning:  # losses, Q and TD error every iteration: the seed's missing metrics
        for name in ("losses/critic", "losses/actor", "q/q1_mean", "q/q2_mean", "q/td_error_mean"):
            assert name in row, (name, row["iteration"])
    assert summary["learner_updates"] == pytest.approx(
        summary["env_steps"] - exp.algo.learning_starts, abs=exp.resources.rollout_fragment_length
    )

    # A healthy run: no CRITICAL alert, it completed, and its validation report says PASS.
    alerts = read_alerts(run)
    assert not [a for a in alerts if a["level"] == "CRITICAL"], alerts
    assert len([a for a in alerts if a["level"] == "WARN"]) <= 1, alerts
    assert summary["status"] == "completed"
    passed, report = write_report(run)
    assert passed, report.read_text()
    assert (run / "report" / "report.png").stat().st_size > 10_000
    assert "q/q1_max" in (run / "report" / "metrics.csv").read_text().splitlines()[0]


@pytest.mark.slow
def test_several_learner_calls_per_iteration_update_exactly_as_one_call(ray_local):
    """Image batches are split into several learner calls per iteration (`learner_batch_max_mb`;
    the shipped CARLA config makes about 8). Splitting must change nothing: same updates, same
    delayed actor steps, same weights, bit for bit, and Q extremes reported across all calls."""
    runs = {}
    for max_mb in (256.0, 0.05):  # one call per iteration; 13 calls of at most 5 updates
        exp = load_config("configs/pendulum_td3.yaml", [f"algo.learner_batch_max_mb={max_mb}",
                                                        "algo.learning_starts=320", "wandb.enabled=false"])
        algo = build_td3_config(exp).build_algo()
        try:
            for _ in range(8):
                result = algo.train()
            learner = algo.learner_group._learner
            runs[max_mb] = (learner.module[DEFAULT_MODULE_ID].get_state(), result[LEARNER_RESULTS][DEFAULT_MODULE_ID],
                            learner.get_optimizer(DEFAULT_MODULE_ID, "actor").state)
        finally:
            algo.stop()
    (one, one_metrics, one_adam), (split, split_metrics, split_adam) = runs[256.0], runs[0.05]
    assert one.keys() == split.keys()
    for name in one:
        assert torch.equal(torch.as_tensor(one[name]), torch.as_tensor(split[name])), name
    assert split_metrics["num_critic_updates"] == one_metrics["num_critic_updates"] == 8 * 64 - 320
    assert [int(s["step"]) for s in split_adam.values()] == [int(s["step"]) for s in one_adam.values()]
    assert (split_metrics["q1_max"], split_metrics["q1_min"]) == (one_metrics["q1_max"], one_metrics["q1_min"])
