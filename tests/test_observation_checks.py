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


def test_a_frozen_camera_repeats_while_the_state_moves_and_nan_is_counted():
    rng = np.random.default_rng(0)
    black = [np.zeros((2, 8, 8), np.uint8)] * 5  # 4 steps, each frame equal to the one before
    live = [rng.integers(0, 256, (2, 8, 8), dtype=np.uint8) for _ in range(5)]
    states = [np.array([float(t), 1.0], np.float32) for t in range(5)]
    states[2] = np.array([np.nan, np.inf], np.float32)
    stats = observation_stats([chunk(black, states), chunk(live, states)])
    assert stats["obs/image/repeated_fraction"] == 0.5  # 4 of the 8 steps
    assert stats["obs/state/repeated_fraction"] == 0.0
    assert stats["obs/non_finite"] == 4.0  # 2 values, in both chunks


def test_a_plain_box_observation_is_one_leaf_named_obs():
    episode = SingleAgentEpisode(
        observations=[np.ones(3, np.float32)] * 3, actions=[np.zeros(1)] * 2, rewards=[0.0] * 2, len_lookback_buffer=0
    ).to_numpy()
    assert observation_stats([episode]) == {"obs/obs/repeated_fraction": 1.0, "obs/non_finite": 0.0}
