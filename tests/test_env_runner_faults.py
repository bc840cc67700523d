"""Fault tolerance: an env that raises in the middle of an episode is re-created inside its env
runner; an env that takes its runner process down gets a new runner. Training completes."""

import json
from pathlib import Path

import pytest

from rl.config import load_config
from rl.train import train
from tests.fault_envs import CRASHING_PENDULUM

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["raise", "exit"])
def test_a_crashing_env_or_env_runner_is_replaced_and_training_completes(ray_local, tmp_path, how):
    marker = tmp_path / "crashed"
    exp = load_config(
        ROOT / "configs" / "pendulum_td3.yaml",
        [
            f"env.id={CRASHING_PENDULUM}",
            f"env.kwargs={json.dumps({'marker': str(marker), 'crash_at_step': 300, 'how': how})}",
            f"experiment.output_dir={tmp_path}",
            "experiment.stop_env_steps=1280",
            "algo.learning_starts=320",
            "resources.num_env_runners=1",
            "resources.env_runner_restart_delay_s=0",
            "evaluation.interval_iters=0",
            "evaluation.episodes=1",
        ],
    )
    summary = train(exp, run_dir=tmp_path / "run", show_progress=False)
    assert marker.read_text() == "crashed"  # the failure did happen, mid-episode (step 300 = episode 2)
    assert summary["status"] == "completed" and summary["env_steps"] >= 1280, summary
