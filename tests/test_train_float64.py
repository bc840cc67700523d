"""End to end on a float64 env: MuJoCo's HalfCheetah-v5 observations are float64 while the
module is float32. Acting, learning, the start-value diagnostic at episode ends, evaluation and
checkpoints all see them; a dtype slip anywhere crashed this run before (issue 17)."""

import math

import numpy as np
import pytest

from rl.config import load_config
from rl.train import train


@pytest.mark.slow
def test_a_short_halfcheetah_run_trains_evaluates_and_stays_healthy(ray_local, tmp_path):
    import gymnasium as gym

    assert gym.make("HalfCheetah-v5").observation_space.dtype == np.float64  # what is tested
    exp = load_config("configs/halfcheetah_td3.yaml", [
        "experiment.stop_env_steps=3000", "algo.learning_starts=1000", "evaluation.interval_iters=20",
        "evaluation.episodes=1", "experiment.checkpoint_every_iters=20", f"experiment.output_dir={tmp_path}",
    ])
    summary = train(exp, run_dir=tmp_path / "run", show_progress=False)
    assert summary["status"] == "completed", summary
    assert summary["env_steps"] >= 3000 and summary["learner_updates"] >= 1900
    assert math.isfinite(summary["final_eval_return_mean"])
    # 1000-step episodes: the start-value diagnostic ran at episode ends after learning started.
    rows = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"q/overestimation"' in rows
