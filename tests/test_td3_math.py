"""TD3's math, against values computed by hand (Fujimoto et al. 2018, Algorithm 1)."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

from rl.td3.td3_learner import clipped_double_q_target, smoothed_target_action
from rl.td3.td3_rl_module import exploration_action, uniform_action
from tests.helpers import td3_module, vector_space

GAMMA = 0.9


def test_target_takes_the_smaller_twin_and_bootstraps_when_not_terminated():
    # y = r + 0.9 * min(Q1', Q2')
    y = clipped_double_q_target(
        rewards=torch.tensor([1.0, -1.0]),
        terminateds=torch.tensor([0.0, 0.0]),
        q1_next=torch.tensor([10.0, 3.0]),
        q2_next=torch.tensor([8.0, 4.0]),
        gamma=GAMMA,
    )
    assert y.tolist() == pytest.approx([1.0 + 0.9 * 8.0, -1.0 + 0.9 * 3.0])  # [8.2, 1.7]


def test_target_on_termination_is_the_reward_alone():
    y = clipped_double_q_target(
        rewards=torch.tensor([2.0]),
        terminateds=torch.tensor([1.0]),
        q1_next=torch.tensor([5.0]),
        q2_next=torch.tensor([6.0]),
        gamma=GAMMA,
    )
    assert y.tolist() == pytest.approx([2.0])


def test_smoothing_noise_is_clipped_and_the_action_stays_in_bounds():
    torch.manual_seed(0)
    target_action = torch.zeros(100_000, 1)
    # policy_noise far above noise_clip: almost every draw hits the clip.
    smoothed = smoothed_target_action(target_action, policy_noise=10.0, noise_clip=0.5)
    assert smoothed.abs().max().item() == pytest.approx(0.5)
    assert (smoothed.abs() == 0.5).float().mean() > 0.9

    # Near the bound, the noisy action is clipped to [-1, 1].
    smoothed = smoothed_target_action(torch.full((100_000, 1), 0.9), 0.2, 0.5)
    assert smoothed.max().item() == 1.0 and smoothed.min().item() >= 0.4 - 1e-6

    # Reference defaults: noise N(0, 0.2) clipped to +-0.5; the std stays close to 0.2.
    noise = smoothed_target_action(target_action, 0.2, 0.5) - target_action
    assert noise.abs().max() <= 0.5
    assert noise.std().item() == pytest.approx(0.2, rel=0.05)


def test_exploration_noise_has_the_configured_scale_and_respects_bounds():
    torch.manual_seed(0)
    action = torch.full((100_000, 2), 0.5)
    explored = exploration_action(action, noise_std=0.1)
    assert (explored - action).std().item() == pytest.approx(0.1, rel=0.05)
    edge = exploration_action(torch.full((100_000, 2), 0.99), noise_std=0.5)
    assert edge.max().item() == 1.0 and edge.min().item() >= -1.0


def test_uniform_warmup_actions_cover_the_whole_range():
    torch.manual_seed(0)
    a = uniform_action(torch.zeros(100_000, 1))
    assert a.min() >= -1.0 and a.max() <= 1.0
    assert a.min() < -0.99 and a.max() > 0.99
    assert a.mean().item() == pytest.approx(0.0, abs=0.01)


def _module(learning_starts: int, exploration_noise: float = 0.1):
    return td3_module(
        vector_space(3),
        action_space=gym.spaces.Box(-2, 2, (1,), np.float32),
        inference_only=True,
        exploration_noise=exploration_noise,
        learning_starts=learning_starts,
    )


def test_module_explores_uniformly_before_learning_starts_then_with_gaussian_noise():
    torch.manual_seed(0)
    module = _module(learning_starts=100)
    obs = {Columns.OBS: torch.zeros(20_000, 3)}  # one observation: one deterministic action
    deterministic = module.forward_inference(obs)[Columns.ACTIONS]
    assert torch.equal(deterministic, deterministic[:1].expand_as(deterministic))

    warmup = module.forward_exploration(obs, t=99)[Columns.ACTIONS]
    assert warmup.min() < -0.99 and warmup.max() > 0.99  # uniform, not around the policy

    noisy = module.forward_exploration(obs, t=100)[Columns.ACTIONS]
    assert (noisy - deterministic).std().item() == pytest.approx(0.1, rel=0.05)
    assert noisy.abs().max() <= 1.0


def test_module_rejects_unbounded_action_spaces():
    with pytest.raises(ValueError, match="finite bounds"):
        td3_module(vector_space(3), action_space=gym.spaces.Box(-np.inf, np.inf, (1,), np.float32))
