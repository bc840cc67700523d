"""rl/td3/observation_checks.py: a dead sensor and NaN observations, counted on real episode chunks."""

import numpy as np
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from rl.td3.observation_checks import observation_stats


def chunk(images, states):
    n = len(images) - 1
    return SingleAgentEpisode(
        observations=[{"image": i, "state": s} for i, s in zip(images, states)],
        actions=[np.zeros(2, np.float32)] * n,
        rewards=[0.0] * n,
        len_lookback_buffer=0,
    ).to_numpy()  # as env runners send them


def test_a_camera_frozen_across_a_reset_while_the_state_moves_and_nan_is_counted():
    rng = np.random.default_rng(0)
    black = [np.zeros((2, 8, 8), np.uint8)] * 5
    states = [np.array([float(t), 1.0], np.float32) for t in range(5)]
    states[2] = np.array([np.nan, np.inf], np.float32)
    stats = observation_stats([chunk(black, states), chunk(black, states)])
    assert stats == {"obs/image/frozen": 1.0, "obs/state/frozen": 0.0, "obs/non_finite": 4.0}
    live = [rng.integers(0, 256, (2, 8, 8), dtype=np.uint8) for _ in range(5)]
    assert observation_stats([chunk(black, states), chunk(live, states)])["obs/image/frozen"] == 0.0


def test_a_goal_image_constant_within_an_episode_is_not_frozen_and_one_episode_is_not_judged():
    goal_a, goal_b = np.zeros((1, 4, 4), np.uint8), np.full((1, 4, 4), 255, np.uint8)
    states = [np.array([float(t)], np.float32) for t in range(4)]
    stats = observation_stats([chunk([goal_a] * 4, states), chunk([goal_b] * 4, states)])
    assert stats["obs/image/frozen"] == 0.0
    assert observation_stats([chunk([goal_a] * 4, states)]) == {"obs/non_finite": 0.0}
