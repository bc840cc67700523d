"""Fault tolerance: an env that raises in the middle of an episode is re-created inside its env
runner; an env that takes its runner process down gets a new runner, with our restart settings,
not RLlib's defaults. Training completes, with synchronous and with asynchronous sampling (where
the runner dies with a sample request in flight)."""

import json
from pathlib import Path

import pytest

from rl.config import load_config
from rl.experiment import build_td3_config
from rl.train import train
from tests.fault_envs import CRASHING_PENDULUM

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("how, async_sampling", [("raise", False), ("exit", False), ("exit", True)])
def test_a_crashing_env_or_env_runner_is_replaced_and_training_completes(ray_local, tmp_path, how, async_sampling):
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
            f"resources.async_sampling={str(async_sampling).lower()}",
            "resources.env_runner_restart_delay_s=0",
            "evaluation.interval_iters=0",
            "evaluation.episodes=1",
        ],
    )
    # Our settings, not RLlib's defaults (which would also restart runners, after 60 s).
    ft = build_td3_config(exp)
    assert ft.restart_failed_sub_environments and ft.restart_failed_env_runners
    assert ft.max_num_env_runner_restarts == exp.resources.max_env_runner_restarts
    assert ft.delay_between_env_runner_restarts_s == exp.resources.env_runner_restart_delay_s == 0

    summary = train(exp, run_dir=tmp_path / "run", show_progress=False)
    assert summary["status"] == "completed" and summary["env_steps"] >= 1280, summary
    # The failure did happen, mid-episode (step 300 = episode 2), in some process at some time.
    crash_pid, crash_time = marker.read_text().split()
    made = [line.split() for line in Path(f"{marker}.created").read_text().splitlines()]
    in_crashed_process = [t for pid, t in made if pid == crash_pid]
    after_crash_elsewhere = [float(t) for pid, t in made if pid != crash_pid and float(t) > float(crash_time)]
    if how == "raise":  # the env is made again inside the same runner process; no new runner
        assert len(in_crashed_process) == 2 and not after_crash_elsewhere, made
    else:  # the runner process is gone: a new one makes its env (when depends on the machine's
        # load: 79 s once on 2 busy cores, so the delay is checked in the config above, not here)
        assert len(in_crashed_process) == 1 and after_crash_elsewhere, made
