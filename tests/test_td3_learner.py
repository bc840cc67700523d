"""The TD3 learner's update schedule, on a real `TD3TorchLearner`: delayed actor and targets."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

from rl.td3 import TD3Config
from rl.td3.td3_learner import NUM_ACTOR_UPDATES, NUM_CRITIC_UPDATES

OBS_DIM, ACT_DIM, BATCH = 3, 1, 32
TAU = 0.1


def _learner(policy_delay: int):
    config = (
        TD3Config()
        .environment(
            observation_space=gym.spaces.Box(-1, 1, (OBS_DIM,), np.float32),
            action_space=gym.spaces.Box(-2, 2, (ACT_DIM,), np.float32),
        )
        .training(policy_delay=policy_delay, tau=TAU, train_batch_size_per_learner=BATCH)
        .rl_module(model_config={"actor_hidden": [16], "critic_hidden": [16]})
        .debugging(seed=0)
    )
    return config.build_learner()


def _batch(num_rows: int) -> MultiAgentBatch:
    rng = np.random.default_rng(0)
    columns = {
        Columns.OBS: rng.normal(size=(num_rows, OBS_DIM)).astype(np.float32),
        Columns.ACTIONS: rng.uniform(-1, 1, (num_rows, ACT_DIM)).astype(np.float32),
        Columns.REWARDS: rng.normal(size=num_rows).astype(np.float32),
        Columns.NEXT_OBS: rng.normal(size=(num_rows, OBS_DIM)).astype(np.float32),
        Columns.TERMINATEDS: np.zeros(num_rows, np.float32),
    }
    return MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(columns)}, env_steps=num_rows)


def _params(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("policy_delay", [2, 3])
def test_actor_and_targets_step_exactly_once_per_policy_delay_critic_updates(policy_delay):
    learner = _learner(policy_delay)
    module = learner.module[DEFAULT_MODULE_ID]
    nets = {name: getattr(module, name) for name in
            ("actor", "critic1", "critic2", "target_actor", "target_critic1", "target_critic2")}

    for update in range(1, 2 * policy_delay + 1):
        before = {name: _params(net) for name, net in nets.items()}
        learner.update(batch=_batch(BATCH), minibatch_size=BATCH, num_epochs=1)
        after = {name: _params(net) for name, net in nets.items()}
        policy_step = update % policy_delay == 0

        assert not _same(before["critic1"], after["critic1"]), "critics step on every update"
        assert not _same(before["critic2"], after["critic2"])
        assert _same(before["actor"], after["actor"]) != policy_step
        for main in ("actor", "critic1", "critic2"):
            target = "target_" + main
            if policy_step:  # Polyak: target <- (1 - tau) * target + tau * main (new main)
                expected = [(1 - TAU) * t + TAU * m for t, m in zip(before[target], after[main])]
                for got, want in zip(after[target], expected):
                    torch.testing.assert_close(got, want)
            else:
                assert _same(before[target], after[target]), f"{target} moved off a policy step"


def test_many_minibatch_updates_in_one_call_keep_the_schedule():
    learner = _learner(policy_delay=2)
    results = learner.update(batch=_batch(5 * BATCH), minibatch_size=BATCH, num_epochs=1)
    stats = results[DEFAULT_MODULE_ID]
    assert stats[NUM_CRITIC_UPDATES].peek() == 5
    assert stats[NUM_ACTOR_UPDATES].peek() == 2  # updates 2 and 4


def test_targets_start_as_exact_copies():
    module = _learner(policy_delay=2).module[DEFAULT_MODULE_ID]
    for main, target in (
        (module.actor, module.target_actor),
        (module.critic1, module.target_critic1),
        (module.critic2, module.target_critic2),
    ):
        assert _same(_params(main), _params(target))
        assert not any(p.requires_grad for p in target.parameters())
