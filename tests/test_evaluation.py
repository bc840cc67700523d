"""Evaluation is what the README says: the deterministic policy (no exploration noise, no uniform
warm-up), on evaluation env runners, never the exploring training runner, whatever
`evaluation.interval_iters` is; and its episodes are not training episodes."""

import numpy as np
import pytest
import torch

from rl.config import load_config
from rl.experiment import build_td3_config


@pytest.mark.parametrize("interval_iters", [0, 2])
def test_evaluation_runs_the_actor_deterministically_apart_from_training(ray_local, interval_iters):
    exp = load_config("configs/pendulum_td3.yaml", [
        f"evaluation.interval_iters={interval_iters}", "evaluation.episodes=2",
        "algo.learning_starts=128", "algo.buffer_size=10000",
    ])
    algo = build_td3_config(exp).build_algo()
    try:
        for _ in range(4):  # past the warm-up: the actor has been updated
            algo.train()
        runner = algo.eval_env_runner
        assert runner is not algo.env_runner and runner.config.explore is False
        trained_episodes = algo.env_runner.metrics.peek("num_episodes_lifetime", default=0)

        # Twice the same evaluation: the same seeds, the same actions, the same return.
        returns = [algo.evaluate()["env_runners"]["episode_return_mean"] for _ in range(2)]
        assert returns[0] == returns[1]

        # The actions taken are the actor's own outputs for the observations seen.
        (episode,) = runner.sample(num_episodes=1)
        observations = torch.as_tensor(np.asarray(episode.get_observations()[:-1]), dtype=torch.float32)
        module = runner.module
        with torch.no_grad():
            actor = module.forward_inference({"obs": observations})["actions"].numpy()
        np.testing.assert_allclose(np.asarray(episode.get_actions()), actor, atol=1e-6)
        assert algo.env_runner.metrics.peek("num_episodes_lifetime", default=0) == trained_episodes
    finally:
        algo.stop()
