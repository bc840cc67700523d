"""Fault injection: real short training runs, each with one thing broken. Each must raise its
CRITICAL alert within a few iterations of learning starting, stop itself, keep no unhealthy
checkpoint, and get a FAIL report that names the reason. A healthy run passes (see
test_train_pendulum.py and test_train_driving.py).
"""

import json
import math
from pathlib import Path

import pytest

from rl.config import load_config
from rl.report import write_report
from rl.train import train
from tests import fault_envs
from tests.image_reach_env import register as register_image_reach
from tests.wandb_records import read_run, read_summary_and_step_metric, run_files

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LEARNING_STARTS = 640  # 10 iterations of 64 steps
FEW_ITERATIONS = 5  # the alert must come at most this many iterations after learning starts


def pendulum(tmp_path, *overrides):
    return load_config(
        CONFIGS / "pendulum_td3.yaml",
        overrides=[
            "experiment.stop_env_steps=4000",
            f"experiment.output_dir={tmp_path}",
            f"algo.learning_starts={LEARNING_STARTS}",
            "evaluation.interval_iters=0",
            "evaluation.episodes=1",
            "experiment.checkpoint_every_iters=5",
            *overrides,
        ],
    )


def assert_stopped_by(summary: dict, rule: str, run_dir: Path) -> None:
    assert summary["status"] == "stopped_unhealthy" and rule in summary["stopped_by"], summary
    assert summary["iterations"] <= LEARNING_STARTS // 64 + 1 + FEW_ITERATIONS, summary
    alerts = [json.loads(line) for line in (run_dir / "alerts.jsonl").read_text().splitlines()]
    assert any(a["level"] == "CRITICAL" and a["rule"] == rule for a in alerts), alerts
    # Checkpoints: only periodic ones written before the alert; no "final" of the broken state.
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name != "replay")
    assert "final" not in checkpoints
    assert all(int(name.split("_")[1]) < summary["iterations"] for name in checkpoints)
    passed, report = write_report(run_dir)
    text = report.read_text()
    assert not passed and "## Verdict: FAIL" in text and f"`{rule}`" in text


@pytest.mark.slow
def test_rewards_larger_than_documented_are_caught_at_the_first_iteration_before_q_diverges(ray_local, tmp_path):
    exp = pendulum(tmp_path, f"env.id={fault_envs.register()}")  # rewards x1000, bounds as documented
    summary = train(exp, run_dir=tmp_path / "run", show_progress=False)
    assert_stopped_by(summary, "reward_out_of_bounds", tmp_path / "run")
    assert summary["iterations"] == 1 and summary["learner_updates"] == 0
    assert "rewards within the env's documented range | **FAIL**" in (tmp_path / "run" / "report" / "report.md").read_text()


@pytest.mark.slow
def test_nan_in_the_loss_is_caught_and_the_run_stops(ray_local, tmp_path, monkeypatch):
    from rl.td3.td3_learner import TD3TorchLearner

    real_loss = TD3TorchLearner.compute_loss_for_module

    def nan_after_100_updates(self, *, module_id, **kwargs):
        loss = real_loss(self, module_id=module_id, **kwargs)
        if self._num_critic_updates[module_id] > 100:  # the critic loss that gets backpropagated
            critic_loss, actor_loss = self._losses[module_id]
            self._losses[module_id] = (critic_loss * math.nan, actor_loss)
        return loss

    monkeypatch.setattr(TD3TorchLearner, "compute_loss_for_module", nan_after_100_updates)
    summary = train(pendulum(tmp_path), run_dir=tmp_path / "run", show_progress=False)
    assert_stopped_by(summary, "non_finite", tmp_path / "run")


@pytest.mark.slow
def test_losses_that_are_not_reported_are_caught_like_the_seeds_missing_metrics(ray_local, tmp_path, monkeypatch):
    import rl.metrics

    paths = {k: v for k, v in rl.metrics.RESULT_PATHS.items() if not k.startswith("losses/")}
    monkeypatch.setattr(rl.metrics, "RESULT_PATHS", paths)
    summary = train(pendulum(tmp_path), run_dir=tmp_path / "run", show_progress=False)
    assert_stopped_by(summary, "missing_metric", tmp_path / "run")
    assert "losses and Q reported every iteration since learning started | **FAIL**" in (
        tmp_path / "run" / "report" / "report.md"
    ).read_text()


@pytest.mark.slow
@pytest.mark.parametrize("encoder_clip", ["null", "1.0"])
def test_a_huge_learning_rate_diverges_and_is_stopped_whether_or_not_the_encoders_are_clipped(
    ray_local, tmp_path, encoder_clip
):
    """The seed blamed its Q explosion on unclipped CNN gradients. The clipped control run says
    otherwise for Adam: clipping a gradient's norm does not bound Adam's step (it divides by the
    gradient's running RMS), so at this learning rate both runs diverge (measured: Q off its
    bound by 4.8x unclipped, 2.2x clipped, both at iteration 11). What stops the run is the
    monitor, not the clip."""
    exp = load_config(
        CONFIGS / "pendulum_td3.yaml",
        overrides=[
            f"env.id={register_image_reach()}",
            # -distance: position in [-1, 1]^2, target in [-0.8, 0.8]^2, at most 1.8 * sqrt(2) apart
            # (the -1.5 once written here was caught by reward_out_of_bounds)
            "env.reward_bounds=[-2.5456, 0.0]",
            "experiment.stop_env_steps=4000",
            f"experiment.output_dir={tmp_path}",
            f"algo.learning_starts={LEARNING_STARTS}",
            "algo.gamma=0.9",
            "algo.actor_lr=1.0",
            "algo.critic_lr=1.0",
            "algo.train_batch_size=64",
            f"algo.grad_clip={{actor.encoder: {encoder_clip}, actor.head: 1.0, critic.encoder: {encoder_clip}, critic.head: 10.0}}",
            "model.actor_hidden=[32]",
            "model.critic_hidden=[32]",
            "model.cnn={channels: [8], kernel_sizes: [4], strides: [2], feature_dim: 16}",
            "evaluation.interval_iters=0",
            "evaluation.episodes=1",
            "experiment.checkpoint_every_iters=5",
        ],
    )
    summary = train(exp, run_dir=tmp_path / "run", show_progress=False)
    # Whichever shows first: Q leaving its bound, or NaN once it overflowed.
    rule = next(r for r in summary["stopped_by"] if r in ("q_out_of_bound", "non_finite"))
    assert_stopped_by(summary, rule, tmp_path / "run")
    # And it really diverged (the bound is right: rewards never left it): Q is past the bound
    # of -2.5456 / (1 - 0.9) = -25.5 .. 0 by more than the slack, or no longer a number.
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    q = [last.get(k, math.nan) for k in ("q/q1_max", "q/q1_min", "losses/critic")]
    assert not all(math.isfinite(v) for v in q) or q[0] > 0.5 * 25.5 or q[1] < -1.5 * 25.5, last
    assert not any(r.get("replay/reward_min", 0.0) < -2.5456 for r in rows)


@pytest.mark.slow
def test_metrics_and_alerts_reach_the_offline_wandb_run(ray_local, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    # Not stopped at the first CRITICAL, so that the learner's metrics reach W&B too.
    exp = pendulum(tmp_path, f"env.id={fault_envs.register()}", "wandb.group=faults", "wandb.tags=[test]",
                   "health.stop_on_critical=false", "experiment.stop_env_steps=1280")
    summary = train(exp, run_dir=tmp_path / "run", show_progress=False)
    assert summary["status"] == "completed" and summary["env_steps"] >= 1280  # alerted, not stopped
    history, alerts = read_run(tmp_path / "run")
    assert len(history) >= LEARNING_STARTS // 64
    last = history[-1]
    for name in ("losses/critic", "q/q1_max", "health/q_excess", "health/critical", "grad/critic.head/post_clip_norm",
                 "learner/actor_saturation", "obs/non_finite"):
        assert name in last, sorted(last)
    assert last["health/critical"] == 1.0
    critical = [(title, level) for title, _, level in alerts if title.startswith("CRITICAL")]
    assert critical[0] == ("CRITICAL: reward_out_of_bounds", "ERROR"), critical
    # Charted against env steps; the project's runs table shows the run went bad, and why.
    (path,) = run_files(tmp_path / "run")
    summary, step_metric = read_summary_and_step_metric(path)
    assert step_metric == "env/steps_sampled"
    assert summary["health/status"] == "critical" and "reward_out_of_bounds (CRITICAL)" in summary["health/rules_fired"]


@pytest.mark.slow
def test_nan_observations_stop_training_with_an_alert_that_names_them_and_keep_the_checkpoints(ray_local, tmp_path):
    exp = pendulum(tmp_path, f"env.id={fault_envs.BROKEN_SENSOR_PENDULUM}")  # NaN from env step 900
    summary = train(exp, run_dir=tmp_path / "run", show_progress=False)
    assert summary["status"] == "crashed" and summary["stopped_by"] == ["training_error"], summary
    assert "non-finite actions: the observation holds NaN or Inf in `obs`" in summary["error"]
    alerts = [json.loads(line) for line in (tmp_path / "run" / "alerts.jsonl").read_text().splitlines()]
    assert [(a["level"], a["rule"]) for a in alerts] == [("CRITICAL", "training_error")]
    assert summary["final_checkpoint"].endswith("iter_000010")  # written before the NaN (step 900)
    passed, _ = write_report(tmp_path / "run")
    assert not passed
