"""End to end: TD3 with the CNN learns to drive on the embedded backend (highway-env).

Budget: 8,000 env steps with a small camera and CNN, about 2 minutes on 2 cores. The random
policy is measured in the same test, on the same env config: it leaves the road within about
two seconds (return about -2, 10 steps). Measured when written: eval return 24, 37 steps.
"""

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from benchmarks.health_zoo import DRIVING_CI_SIZE
from callbacks.alerts import read_alerts
from rl.config import load_config
from rl.report import write_report
from rl.train import train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "driving_embedded_td3.yaml"
STEPS = 8000
SMALL = [*DRIVING_CI_SIZE, "evaluation.episodes=10"]


def _random_policy(env_id: str, env_kwargs: dict, episodes: int = 20) -> tuple[float, float]:
    env = gym.make(env_id, **env_kwargs)
    env.action_space.seed(0)
    returns, lengths = [], []
    for episode in range(episodes):
        env.reset(seed=1000 + episode)
        total, steps, done = 0.0, 0, False
        while not done:
            _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
            total, steps, done = total + reward, steps + 1, terminated or truncated
        returns.append(total)
        lengths.append(steps)
    env.close()
    return float(np.mean(returns)), float(np.mean(lengths))


@pytest.mark.slow
def test_td3_with_cnn_learns_to_drive_on_the_embedded_backend(ray_local, tmp_path):
    exp = load_config(
        CONFIG,
        overrides=[f"experiment.stop_env_steps={STEPS}", f"experiment.output_dir={tmp_path}", *SMALL],
    )
    summary = train(exp, run_dir=tmp_path / "run", show_progress=False)

    random_return, random_len = _random_policy(exp.env.id, exp.env.kwargs)
    assert random_len < 15 and random_return < 0, (random_return, random_len)  # the task is not trivial
    assert summary["final_eval_return_mean"] > random_return + 10.0, (summary, random_return)
    assert summary["final_eval_len_mean"] > 2 * random_len, (summary, random_len)

    # How episodes ended and what the reward was made of, every iteration, under stable names.
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("env/episode_end/") and v != v for line in lines for k, v in line.items())
    last = [line for line in lines if "env/episode_end/collision" in line][-1]
    ends = [last.get(f"env/episode_end/{r}") for r in ("collision", "off_route", "stuck", "time_limit")]
    assert None not in ends and sum(ends) == pytest.approx(1.0), last
    assert last["env/reward/progress"] > 0, last

    # A healthy run: no CRITICAL alert, and its validation report says PASS.
    alerts = read_alerts(tmp_path / "run")
    assert not [a for a in alerts if a["level"] == "CRITICAL"], alerts
    assert len([a for a in alerts if a["level"] == "WARN"]) <= 1, alerts
    passed, report = write_report(tmp_path / "run")
    assert passed, report.read_text()
