"""rl/td3/start_values.py: the TD3 paper's overestimation measure, computed by hand."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rl.td3.start_values import EpisodeStarts, start_values
from tests.helpers import td3_learner, vector_space


def chunk(episode_id, t_started, obs, actions, rewards, terminated=False, truncated=False):
    return SimpleNamespace(
        id_=episode_id,
        t_started=t_started,
        get_observations=lambda i: obs[i],
        get_actions=lambda i: actions[i],
        get_rewards=lambda: rewards,
        is_done=terminated or truncated,
        is_truncated=truncated,
    )


def test_returns_are_discounted_from_the_start_across_chunks_and_only_finished_episodes_count():
    starts = EpisodeStarts(gamma=0.5)
    o = [np.array([float(i)], np.float32) for i in range(6)]
    a = [np.array([0.1 * i], np.float32) for i in range(6)]
    # Episode A: rewards 1, 2 | 4 (terminated); episode B starts, never ends; C began earlier.
    assert starts.add([chunk("A", 0, o[:3], a[:2], [1.0, 2.0]), chunk("B", 0, o, a, [1.0])]) == []
    finished = starts.add([chunk("A", 2, o[2:4], a[2:3], [4.0], terminated=True), chunk("C", 7, o, a, [9.0], truncated=True)])
    assert len(finished) == 1
    (a_end,) = finished
    assert a_end.discounted_return == pytest.approx(1.0 + 0.5 * 2.0 + 0.25 * 4.0)
    assert a_end.discount == pytest.approx(0.125) and a_end.tail_obs is None
    assert a_end.obs == o[0] and a_end.action == a[0]


def test_a_truncated_episode_gets_the_critics_value_of_where_it_stopped():
    learner = td3_learner(vector_space(3))
    module = learner.module["default_policy"].unwrapped()
    starts = EpisodeStarts(gamma=0.9)
    obs = [np.full(3, 0.1 * i, np.float32) for i in range(3)]
    acts = [np.array([0.2, 0.5], np.float32), np.array([-0.3, 0.0], np.float32)]
    (finished,) = starts.add([chunk("T", 0, obs, acts, [1.0, 1.0], truncated=True)])
    q_start, returns = start_values(learner, [finished])
    with torch.no_grad():
        expected_q0 = module.critic(torch.tensor(obs[:1]), torch.tensor(acts[:1]))[0]
        tail = torch.tensor(obs[2:3])
        tail_q = module.critic(tail, module.actor(tail))[0]
    assert q_start == pytest.approx(expected_q0.numpy(), rel=1e-5)
    assert returns == pytest.approx(1.0 + 0.9 + 0.81 * tail_q.numpy(), rel=1e-5)


def test_float64_observations_like_mujocos_are_evaluated_in_the_critics_float32():
    # HalfCheetah crashed here: "mat1 and mat2 must have the same dtype" (Double and Float).
    learner = td3_learner(vector_space(3))
    starts = EpisodeStarts(gamma=0.9)
    obs = [np.full(3, 0.1 * i, np.float64) for i in range(3)]
    acts = [np.array([0.2, 0.5], np.float32)] * 2
    (finished,) = starts.add([chunk("M", 0, obs, acts, [1.0, 1.0], truncated=True)])
    q64, _ = start_values(learner, [finished])
    (finished,) = EpisodeStarts(gamma=0.9).add(
        [chunk("M", 0, [o.astype(np.float32) for o in obs], acts, [1.0, 1.0], truncated=True)]
    )
    q32, _ = start_values(learner, [finished])
    assert q64 == pytest.approx(q32)
