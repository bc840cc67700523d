"""The CNN actor-critic for image+state observations: input checks, scaling, shapes, the shared
encoder option, and weight sync to the env runners' actor-only copy."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

from models import ImageStateEncoder
from tests.helpers import ACTION_SPACE, image_state_space, random_obs, td3_module

SPACE = image_state_space(frames=2, size=16, state_dim=3)
CNN = {"channels": [4, 8], "kernel_sizes": [3, 3], "strides": [2, 2], "feature_dim": 8}


def _encoder(space=SPACE, **cnn) -> ImageStateEncoder:
    return ImageStateEncoder(space, **{**CNN, **cnn}, activation="relu")


def _obs(n: int = 5, space=SPACE) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v) for k, v in random_obs(space, n, np.random.default_rng(0)).items()}


def test_output_is_image_features_followed_by_the_state_vector():
    encoder = _encoder()
    obs = _obs()
    features = encoder(obs)
    assert features.shape == (5, 8 + 3) and encoder.out_dim == 11
    torch.testing.assert_close(features[:, 8:], obs["state"])
    assert features[:, :8].abs().max() <= 1.0  # LayerNorm + tanh bound the image features


def test_pixels_are_scaled_to_unit_range_inside_the_model():
    encoder = _encoder()
    first_conv = encoder.conv[0]
    with torch.no_grad():  # the first conv averages its 2x3x3 window
        first_conv.weight.fill_(1.0 / 18)
        first_conv.bias.zero_()
    seen = {}
    first_conv.register_forward_hook(lambda m, inp, out: seen.update(out=out))
    obs = _obs()
    obs["image"] = torch.full_like(obs["image"], 255)
    encoder(obs)
    torch.testing.assert_close(seen["out"], torch.ones_like(seen["out"]))  # 255 -> 1.0


@pytest.mark.parametrize(
    "image, message",
    [
        (torch.zeros(5, 2, 16, 16), r"'image': expected uint8 .*got dtype torch.float32"),
        (torch.zeros(5, 16, 16, 2, dtype=torch.uint8), r"got shape \(5, 16, 16, 2\) \(channels-last\?"),
        (torch.zeros(5, 3, 16, 16, dtype=torch.uint8), r"shape \(batch, 2, 16, 16\), got shape \(5, 3, 16, 16\)"),
        (torch.zeros(5, 16, 16, dtype=torch.uint8), r"got shape \(5, 16, 16\)"),
    ],
)
def test_a_wrong_image_is_a_clear_error_not_a_silent_broadcast(image, message):
    obs = _obs()
    obs["image"] = image
    with pytest.raises(ValueError, match=message):
        _encoder()(obs)


def test_a_wrong_state_vector_is_a_clear_error():
    obs = _obs()
    obs["state"] = torch.zeros(5, 4)
    with pytest.raises(ValueError, match=r"'state': expected shape \(5, 3\), got \(5, 4\)"):
        _encoder()(obs)


@pytest.mark.parametrize(
    "space, message",
    [
        (gym.spaces.Dict({"image": SPACE["image"]}), r"exactly the keys 'image' and 'state'"),
        (
            gym.spaces.Dict({"image": gym.spaces.Box(0, 1, (2, 16, 16), np.float32), "state": SPACE["state"]}),
            r"observation space 'image': expected a uint8 Box",
        ),
        (
            gym.spaces.Dict({"image": gym.spaces.Box(0, 255, (16, 16), np.uint8), "state": SPACE["state"]}),
            r"observation space 'image': expected a uint8 Box of shape \(frames, height, width\)",
        ),
    ],
)
def test_observation_spaces_the_model_cannot_read_are_rejected_at_build(space, message):
    with pytest.raises(ValueError, match=message):
        _encoder(space)


def test_a_cnn_that_shrinks_the_image_to_nothing_is_rejected_at_build():
    with pytest.raises(ValueError, match=r"model.cnn: a \(2, 16, 16\) image has no pixels left after conv layer 3"):
        _encoder(channels=[4, 4, 4], kernel_sizes=[3, 3, 5], strides=[2, 2, 2])  # 16 -> 7 -> 3 -> none


def test_actor_and_twin_critic_output_shapes_and_bounds():
    module = td3_module(SPACE)
    obs = _obs()
    actions = module.actor(obs)
    assert actions.shape == (5, 2) and actions.abs().max() <= 1.0
    out = module.forward_train({Columns.OBS: obs, Columns.ACTIONS: actions})
    assert out["q1"].shape == out["q2"].shape == (5,)
    assert module.actor.encoder is not module.critic.encoder  # own encoders by default


@pytest.mark.parametrize("share_encoder", [False, True])
def test_env_runner_copy_acts_exactly_like_the_learners_actor(share_encoder):
    learner_module = td3_module(SPACE, share_encoder=share_encoder)
    assert (learner_module.actor.encoder is learner_module.critic.encoder) == share_encoder
    runner_module = td3_module(SPACE, inference_only=True, share_encoder=share_encoder)
    assert not hasattr(runner_module, "critic")
    runner_module.set_state(learner_module.get_state(inference_only=True))
    obs = {Columns.OBS: _obs()}
    torch.testing.assert_close(
        runner_module.forward_inference(obs)[Columns.ACTIONS],
        learner_module.forward_inference(obs)[Columns.ACTIONS],
    )


def test_a_vector_observation_still_gets_mlp_networks():
    module = td3_module(gym.spaces.Box(-1, 1, (3,), np.float32), action_space=ACTION_SPACE)
    assert not list(module.actor.encoder.parameters()) and not list(module.critic.encoder.parameters())
    assert module.actor(torch.zeros(4, 3)).shape == (4, 2)
