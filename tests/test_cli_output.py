"""What a user sees when starting a run: what is trained and where results go, the progress,
alerts; not Ray's and RLlib's own notices, which `--verbose` brings back."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTICES = ("Token authentication is enabled", "You are running TD3 on the new API stack",
           "RLModuleConfig object", "Install gputil", "Started a local Ray instance")


def start(tmp_path: Path, *extra: str) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "rl.train", "--config", "configs/pendulum_td3.yaml", "--no-progress",
         "--set", "experiment.stop_env_steps=128", "--set", "algo.learning_starts=64", "--set", "wandb.enabled=false",
         "--set", "evaluation.episodes=1", "--set", f"experiment.output_dir={tmp_path}", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout + run.stderr


@pytest.mark.parametrize("verbose", [False, True])
def test_a_run_starts_quietly_and_verbose_shows_ray_and_rllib_notices(tmp_path, verbose):
    output = start(tmp_path, *(["--verbose"] if verbose else []))
    assert "Training pendulum_td3: TD3 on Pendulum-v1, 128 env steps" in output
    assert f"results: {tmp_path}/pendulum_td3-" in output and "Done: " in output
    shown = [notice for notice in NOTICES if notice in output]
    if verbose:
        assert "You are running TD3 on the new API stack" in shown, output
    else:
        assert shown == [], output
