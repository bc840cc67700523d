"""Module-wise gradient clipping: limits hold after clipping, norms are reported, groups cover
every parameter, and the actor and critic losses only move their own networks."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from torch import nn

from rl.td3 import TD3Config
from rl.td3.td3_learner import ACTOR, CRITIC, grad_metric
from rl.td3.td3_rl_module import TD3TorchRLModule

OBS_DIM, ACT_DIM, BATCH = 3, 1, 32
LIMITS = {"actor.encoder": 1.0, "actor.head": 0.5, "critic.encoder": 10.0, "critic.head": 2.0}


class EncodedTD3Module(TD3TorchRLModule):
    """The MLP module with a trainable layer in every encoder, so all four groups have parameters
    (the CNN module of issue 4 will have them for real)."""

    def setup(self):
        super().setup()
        self.actor.encoder = nn.Linear(OBS_DIM, OBS_DIM)
        if not self.inference_only:
            self.critic1.encoder = nn.Linear(OBS_DIM, OBS_DIM)
            self.critic2.encoder = nn.Linear(OBS_DIM, OBS_DIM)


class UngroupedParamModule(EncodedTD3Module):
    def setup(self):
        super().setup()
        self.extra = nn.Linear(2, 2)  # belongs to no group


class DoublyGroupedModule(EncodedTD3Module):
    def gradient_groups(self):
        groups = super().gradient_groups()
        groups["critic.head"].append(self.actor.head)
        return groups


def _learner(module_class=EncodedTD3Module, limits=LIMITS, policy_delay=1):
    config = (
        TD3Config()
        .environment(
            observation_space=gym.spaces.Box(-1, 1, (OBS_DIM,), np.float32),
            action_space=gym.spaces.Box(-1, 1, (ACT_DIM,), np.float32),
        )
        .training(policy_delay=policy_delay, train_batch_size_per_learner=BATCH,
                  grad_clip_by_group=dict(limits))
        .rl_module(rl_module_spec=RLModuleSpec(module_class=module_class),
                   model_config={"actor_hidden": [16], "critic_hidden": [16]})
        .debugging(seed=0)
    )
    return config.build_learner()


def _columns(reward_scale: float = 1.0) -> dict:
    rng = np.random.default_rng(0)
    return {
        Columns.OBS: rng.normal(size=(BATCH, OBS_DIM)).astype(np.float32),
        Columns.ACTIONS: rng.uniform(-1, 1, (BATCH, ACT_DIM)).astype(np.float32),
        Columns.REWARDS: (reward_scale * rng.normal(size=BATCH)).astype(np.float32),
        Columns.NEXT_OBS: rng.normal(size=(BATCH, OBS_DIM)).astype(np.float32),
        Columns.TERMINATEDS: np.zeros(BATCH, np.float32),
    }


def test_huge_gradients_are_clipped_to_each_groups_limit_and_reported():
    learner = _learner()
    module = learner.module[DEFAULT_MODULE_ID]
    with torch.no_grad():  # steep critics: huge dQ/da, so huge actor gradients too
        for critic in (module.critic1, module.critic2):
            for p in critic.parameters():
                p.mul_(30.0)
    # Rewards of 1e6 make the critics' gradients enormous.
    batch = MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(_columns(1e6))}, env_steps=BATCH)
    stats = learner.update(batch=batch, minibatch_size=BATCH, num_epochs=1)[DEFAULT_MODULE_ID]
    for group, limit in LIMITS.items():
        pre = stats[grad_metric(group, "pre_clip_norm")].peek()
        post = stats[grad_metric(group, "post_clip_norm")].peek()
        assert pre > 10 * limit, (group, pre)
        assert post <= limit * (1 + 1e-5), (group, post, limit)
        assert stats[grad_metric(group, "clip_fraction")].peek() == 1.0


def test_clipping_scales_a_group_to_its_limit_keeping_direction():
    learner = _learner(limits={**LIMITS, "critic.head": None})
    refs = learner._gradient_groups[DEFAULT_MODULE_ID]
    # actor.head gradient, one vector over all its tensors: norm 5 (3-4-5), limit 0.5.
    grads = {}
    for i, ref in enumerate(refs["actor.head"]):
        grads[ref] = torch.zeros_like(learner._params[ref])
    first, second = refs["actor.head"][:2]
    grads[first].view(-1)[0], grads[second].view(-1)[0] = 3.0, 4.0
    critic_ref = refs["critic.head"][0]
    grads[critic_ref] = torch.full_like(learner._params[critic_ref], 100.0)  # unclipped group
    before_critic = grads[critic_ref].clone()

    out = learner.postprocess_gradients_for_module(
        module_id=DEFAULT_MODULE_ID, config=learner.config, module_gradients_dict=grads
    )
    assert out[first].view(-1)[0].item() == pytest.approx(0.3, rel=1e-5)  # 3 * 0.5 / 5
    assert out[second].view(-1)[0].item() == pytest.approx(0.4, rel=1e-5)
    assert torch.equal(out[critic_ref], before_critic)  # None: no clipping


def test_a_parameter_in_no_group_fails_the_build_naming_it():
    with pytest.raises(ValueError, match=r"in no gradient group.*'extra.weight', 'extra.bias'"):
        _learner(UngroupedParamModule)


def test_a_parameter_in_two_groups_fails_the_build_naming_it():
    with pytest.raises(ValueError, match=r"parameter 'actor.head.0.weight' is in two gradient groups"):
        _learner(DoublyGroupedModule)


def test_every_group_needs_an_explicit_limit():
    limits = {k: v for k, v in LIMITS.items() if k != "critic.encoder"}
    with pytest.raises(ValueError, match="exactly the groups"):
        _learner(limits=limits)


def test_actor_loss_moves_only_the_actor_and_critic_loss_only_the_critics():
    learner = _learner(limits={k: None for k in LIMITS}, policy_delay=1)
    module = learner.module[DEFAULT_MODULE_ID]
    batch = {k: torch.from_numpy(v) for k, v in _columns().items()}
    learner.compute_losses(
        fwd_out={DEFAULT_MODULE_ID: module.forward_train(batch)}, batch={DEFAULT_MODULE_ID: batch}
    )
    critic_loss, actor_loss = learner._losses[DEFAULT_MODULE_ID]
    critic_params = learner._optimizer_params(DEFAULT_MODULE_ID, CRITIC)
    actor_params = learner._optimizer_params(DEFAULT_MODULE_ID, ACTOR)
    # What each loss alone gives its own network.
    want_critic = torch.autograd.grad(critic_loss, critic_params, retain_graph=True)
    want_actor = torch.autograd.grad(actor_loss, actor_params, retain_graph=True)

    grads = learner.compute_gradients({DEFAULT_MODULE_ID: critic_loss + actor_loss})
    for param, want in zip(critic_params, want_critic):
        torch.testing.assert_close(param.grad, want)  # nothing added by the actor loss
    for param, want in zip(actor_params, want_actor):
        torch.testing.assert_close(param.grad, want)
    assert len(grads) == len(critic_params) + len(actor_params)
