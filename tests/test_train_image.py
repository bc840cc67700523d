"""End to end: TD3 with the CNN learns from camera images (ImageReach, tests/image_reach_env.py).

The target's position is only in the image, so beating an image-blind policy (about -15) means
the CNN learned to read it. The random policy's return is measured here, on the same env.
"""

import gymnasium as gym
import numpy as np
import pytest

from rl.config import parse_config
from rl.train import train
from tests.image_reach_env import register

STEPS = 6000  # about 30 s on 2 cores


def _random_policy_return(env_id: str, episodes: int = 200) -> float:
    env = gym.make(env_id)
    env.action_space.seed(0)
    returns = []
    for episode in range(episodes):
        env.reset(seed=episode)
        total, done = 0.0, False
        while not done:
            _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
            total, done = total + reward, terminated or truncated
        returns.append(total)
    return float(np.mean(returns))


@pytest.mark.slow
@pytest.mark.parametrize("share_encoder", [False, True])
def test_td3_with_cnn_learns_to_read_the_target_from_the_image(ray_local, tmp_path, share_encoder):
    env_id = register()
    exp = parse_config(
        {
            "experiment": {"name": "image_reach", "stop_env_steps": STEPS, "output_dir": str(tmp_path)},
            "env": {"id": env_id},
            "algo": {
                "gamma": 0.9,  # 20-step episodes
                "actor_lr": 1e-3,
                "critic_lr": 1e-3,
                "train_batch_size": 128,
                "learning_starts": 1000,
                "buffer_size": 100_000,
            },
            "model": {
                "actor_hidden": [64, 64],
                "critic_hidden": [64, 64],
                "cnn": {"channels": [8, 16], "kernel_sizes": [3, 3], "strides": [2, 2], "feature_dim": 32},
                "share_encoder": share_encoder,
            },
            "evaluation": {"interval_iters": 0, "episodes": 50},
        }
    )
    summary = train(exp, run_dir=tmp_path / "run", show_progress=False)

    random_return = _random_policy_return(env_id)
    assert random_return < -15.0  # sanity: the task is not trivial
    assert summary["final_eval_return_mean"] > -5.0, (summary, random_return)
    assert summary["final_eval_len_mean"] < 10.0, summary  # reaches the target, not the time limit
