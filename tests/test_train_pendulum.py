"""End to end: `rl.train` learns Pendulum-v1 with TD3, as the reference implementations do."""

import json

import pytest

from callbacks.alerts import read_alerts
from rl.config import load_config
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
