"""Module-wise gradient clipping on the real CNN actor-critic: limits hold after clipping, norms
are reported, groups cover every parameter, and the actor and critic losses only move their own
networks."""

import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from torch import nn

from rl.td3.td3_learner import ACTOR, CRITIC, grad_metric
from rl.td3.td3_rl_module import TD3TorchRLModule
from tests.helpers import as_batch, image_state_space, td3_learner, transition_columns

BATCH = 32
OBS_SPACE = image_state_space()
LIMITS = {"actor.encoder": 1.0, "actor.head": 0.5, "critic.encoder": 10.0, "critic.head": 2.0}


class UngroupedParamModule(TD3TorchRLModule):
    def setup(self):
        super().setup()
        self.extra = nn.Linear(2, 2)  # belongs to no group


class DoublyGroupedModule(TD3TorchRLModule):
    def gradient_groups(self):
        groups = super().gradient_groups()
        groups["critic.head"].append(self.actor.head)
        return groups


def _learner(module_class=TD3TorchRLModule, limits=LIMITS, policy_delay=1, share_encoder=False):
    return td3_learner(
        OBS_SPACE,
        module_class=module_class,
        model={"share_encoder": share_encoder},
        policy_delay=policy_delay,
        train_batch_size_per_learner=BATCH,
        grad_clip_by_group=dict(limits),
    )


def test_huge_gradients_are_clipped_to_each_groups_limit_and_reported():
    learner = _learner()
    critic = learner.module[DEFAULT_MODULE_ID].critic
    with torch.no_grad():  # steep critic heads: huge dQ/da, so huge actor gradients too
        for p in [*critic.q1_head.parameters(), *critic.q2_head.parameters()]:
            p.mul_(30.0)
    # Rewards of 1e6 make the critic's gradients enormous.
    batch = as_batch(transition_columns(OBS_SPACE, BATCH, reward_scale=1e6))
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
    grads = {ref: torch.zeros_like(learner._params[ref]) for ref in refs["actor.head"]}
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


def test_every_cnn_parameter_is_in_an_encoder_group():
    learner = _learner()
    module = learner.module[DEFAULT_MODULE_ID]
    refs = learner._gradient_groups[DEFAULT_MODULE_ID]
    for group, encoder in (("actor.encoder", module.actor.encoder), ("critic.encoder", module.critic.encoder)):
        grouped = {id(learner._params[ref]) for ref in refs[group]}
        conv_params = list(encoder.conv.parameters()) + list(encoder.projection.parameters())
        assert conv_params and grouped == {id(p) for p in conv_params}, group


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


@pytest.mark.parametrize("share_encoder", [False, True])
def test_actor_loss_moves_only_the_actor_and_critic_loss_only_the_critics(share_encoder):
    learner = _learner(limits={k: None for k in LIMITS}, share_encoder=share_encoder)
    module = learner.module[DEFAULT_MODULE_ID]
    columns = transition_columns(OBS_SPACE, BATCH)
    batch = learner._convert_batch_type(as_batch(columns))[DEFAULT_MODULE_ID]
    learner.compute_losses(
        fwd_out={DEFAULT_MODULE_ID: module.forward_train(batch)}, batch={DEFAULT_MODULE_ID: batch}
    )
    critic_loss, actor_loss = learner._losses[DEFAULT_MODULE_ID]
    critic_params = learner._optimizer_params(DEFAULT_MODULE_ID, CRITIC)
    actor_params = learner._optimizer_params(DEFAULT_MODULE_ID, ACTOR)
    assert not {id(p) for p in critic_params} & {id(p) for p in actor_params}
    # What each loss alone gives its own network.
    want_critic = torch.autograd.grad(critic_loss, critic_params, retain_graph=True)
    want_actor = torch.autograd.grad(actor_loss, actor_params, retain_graph=True)

    grads = learner.compute_gradients({DEFAULT_MODULE_ID: critic_loss + actor_loss})
    for param, want in zip(critic_params, want_critic):
        torch.testing.assert_close(param.grad, want)  # nothing added by the actor loss
    for param, want in zip(actor_params, want_actor):
        torch.testing.assert_close(param.grad, want)
    assert len(grads) == len(critic_params) + len(actor_params)
    if share_encoder:  # the shared encoder is the critic's: the actor has no encoder parameters
        assert module.actor.encoder is module.critic.encoder
        encoder_ids = {id(p) for p in module.critic.encoder.parameters()}
        assert not encoder_ids & {id(p) for p in actor_params}


def test_a_group_without_a_limit_keeps_even_a_non_finite_gradient_as_it_is():
    """Its norm is Inf; a scale computed from it (limit / Inf, Inf / Inf) would turn the whole
    group's gradients into zeros or NaN. Unclipped means untouched: the Inf shows where it is."""
    learner = _learner(limits={**LIMITS, "critic.head": None})
    refs = learner._gradient_groups[DEFAULT_MODULE_ID]["critic.head"]
    grads = {ref: torch.full_like(learner._params[ref], 2.0) for ref in refs}
    grads[refs[0]].view(-1)[0] = float("inf")
    before = {ref: g.clone() for ref, g in grads.items()}
    learner.postprocess_gradients_for_module(module_id=DEFAULT_MODULE_ID, config=learner.config, module_gradients_dict=grads)
    for ref in refs:
        assert torch.equal(grads[ref], before[ref])
    stats = learner.last_update_statistics()
    assert stats[(DEFAULT_MODULE_ID, grad_metric("critic.head", "pre_clip_norm"))][0] == float("inf")
    assert stats[(DEFAULT_MODULE_ID, grad_metric("critic.head", "clip_fraction"))][0] == 0.0


def test_a_non_finite_gradient_in_one_group_leaves_the_other_groups_clipped_as_before():
    """The groups are measured together (one norm per tensor, summed per group): an Inf in one
    group must not reach another group's norm or scale."""
    learner = _learner()
    refs = learner._gradient_groups[DEFAULT_MODULE_ID]
    grads = {ref: torch.zeros_like(learner._params[ref]) for ref in [*refs["actor.head"], *refs["critic.head"]]}
    grads[refs["actor.head"][0]].view(-1)[0] = float("inf")
    first, second = refs["critic.head"][:2]
    grads[first].view(-1)[0], grads[second].view(-1)[0] = 3.0, 4.0  # norm 5, limit 2: scaled by 0.4
    learner.update_stats = []
    learner.postprocess_gradients_for_module(module_id=DEFAULT_MODULE_ID, config=learner.config, module_gradients_dict=grads)
    stat = lambda group, name: learner.last_update_statistics()[(DEFAULT_MODULE_ID, grad_metric(group, name))][0].item()
    assert stat("critic.head", "pre_clip_norm") == pytest.approx(5.0, rel=1e-6)
    assert stat("critic.head", "post_clip_norm") == pytest.approx(2.0, rel=1e-5)
    assert grads[first].view(-1)[0].item() == pytest.approx(1.2, rel=1e-5)
    assert stat("actor.head", "pre_clip_norm") == float("inf")
