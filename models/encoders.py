"""Encoders: observation -> feature vector. The part of each network before its MLP head.

- `FlattenEncoder` for vector observations (Pendulum, MuJoCo): no parameters.
- `ImageStateEncoder` for driving observations, a dict of
    `image`: uint8 (frames, height, width), channels-first, the last k camera frames stacked;
    `state`: float32 (n,), speed, previous action, route features...
  The image goes through a CNN and a projection to `feature_dim`; the state vector is appended.

Observations are checked on every forward pass (or once, by `prepare`, for several encoders that
read the same ones): a channels-last or float image would otherwise broadcast or convert silently
into garbage features.
"""

from __future__ import annotations

from typing import Any, Sequence

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from models.mlp import ACTIVATIONS

IMAGE, STATE = "image", "state"


class FlattenEncoder(nn.Flatten):
    def __init__(self, observation_space: gym.spaces.Box):
        super().__init__()
        self.out_dim = int(np.prod(observation_space.shape))

    def prepare(self, obs: torch.Tensor) -> torch.Tensor:
        """Vectors are read as they are (see `ImageStateEncoder.prepare`)."""
        return obs


class Pixels(dict):
    """Image+state observations already checked and converted: `image` float pixels in [0, 1].
    Several encoders read the same observations in one TD3 update (the critic's and the actor's
    the batch, both targets' the next observations); each converting them itself would repeat
    a pass over an update's largest tensors (~1 ms each at batch 256 of the CI size on a CPU)."""


class ImageStateEncoder(nn.Module):
    def __init__(
        self,
        observation_space: gym.spaces.Dict,
        channels: Sequence[int],
        kernel_sizes: Sequence[int],
        strides: Sequence[int],
        feature_dim: int,
        activation: str,
    ):
        super().__init__()
        image_space, state_space = check_image_state_space(observation_space)
        self.image_shape = tuple(image_space.shape)
        self.state_dim = state_space.shape[0]

        layers: list[nn.Module] = []
        in_channels, height, width = self.image_shape
        for i, (out_channels, kernel, stride) in enumerate(zip(channels, kernel_sizes, strides)):
            height, width = (height - kernel) // stride + 1, (width - kernel) // stride + 1
            if height < 1 or width < 1:
                raise ValueError(
                    f"model.cnn: a {self.image_shape} image has no pixels left after conv layer "
                    f"{i + 1} (kernel {kernel}, stride {stride}); use fewer layers, smaller "
                    f"kernels or strides, or larger images"
                )
            layers += [nn.Conv2d(in_channels, out_channels, kernel, stride), ACTIVATIONS[activation]()]
            in_channels = out_channels
        self.conv = nn.Sequential(*layers, nn.Flatten())
        # LayerNorm + tanh bound the image features (SAC-AE, DrQ-v2): the heads see inputs of a
        # fixed scale however the conv weights move, which keeps Q targets from chasing them.
        self.projection = nn.Sequential(
            nn.Linear(in_channels * height * width, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh()
        )
        self.out_dim = feature_dim + self.state_dim

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        pixels = obs if isinstance(obs, Pixels) else self.prepare(obs)
        features = self.projection(self.conv(pixels[IMAGE]))
        return torch.cat([features, pixels[STATE]], dim=-1)

    def prepare(self, obs: dict[str, torch.Tensor]) -> Pixels:
        """The observations checked and converted as `forward` reads them."""
        image, state = obs[IMAGE], obs[STATE]
        self._check(image, state)
        # to [0, 1] here, in the model; in place: one new tensor, not two
        return Pixels({IMAGE: image.float().mul_(1.0 / 255.0), STATE: state.float()})

    def _check(self, image: torch.Tensor, state: torch.Tensor) -> None:
        expected = f"uint8 images of shape (batch, {', '.join(map(str, self.image_shape))})"
        if image.dtype != torch.uint8:
            raise ValueError(f"observation {IMAGE!r}: expected {expected}, got dtype {image.dtype}")
        if tuple(image.shape[1:]) != self.image_shape:
            hint = (
                " (channels-last? images must be channels-first)"
                if tuple(image.shape[1:]) == (*self.image_shape[1:], self.image_shape[0])
                else ""
            )
            raise ValueError(
                f"observation {IMAGE!r}: expected {expected}, got shape {tuple(image.shape)}{hint}"
            )
        if state.dim() != 2 or state.shape[1] != self.state_dim or state.shape[0] != image.shape[0]:
            raise ValueError(
                f"observation {STATE!r}: expected shape ({image.shape[0]}, {self.state_dim}), "
                f"got {tuple(state.shape)}"
            )


def check_image_state_space(space: gym.spaces.Dict) -> tuple[gym.spaces.Box, gym.spaces.Box]:
    """The image and state sub-spaces, or a ValueError naming what is wrong."""
    if set(space.spaces) != {IMAGE, STATE}:
        raise ValueError(
            f"dict observations must have exactly the keys {IMAGE!r} and {STATE!r}, "
            f"got {sorted(space.spaces)}"
        )
    image, state = space[IMAGE], space[STATE]
    if not (isinstance(image, gym.spaces.Box) and image.dtype == np.uint8 and len(image.shape) == 3):
        raise ValueError(
            f"observation space {IMAGE!r}: expected a uint8 Box of shape (frames, height, width), "
            f"got {image}"
        )
    if not (isinstance(state, gym.spaces.Box) and len(state.shape) == 1):
        raise ValueError(f"observation space {STATE!r}: expected a 1-D Box, got {state}")
    return image, state


def build_encoder(observation_space: gym.Space, model_config: dict[str, Any]) -> nn.Module:
    """The encoder for an observation space: CNN + state for image dicts, flatten for vectors."""
    if isinstance(observation_space, gym.spaces.Dict):
        cnn = model_config["cnn"]
        return ImageStateEncoder(
            observation_space,
            channels=cnn["channels"],
            kernel_sizes=cnn["kernel_sizes"],
            strides=cnn["strides"],
            feature_dim=cnn["feature_dim"],
            activation=model_config["activation"],
        )
    if isinstance(observation_space, gym.spaces.Box):
        return FlattenEncoder(observation_space)
    raise ValueError(
        f"TD3 needs a Box observation space or a Dict of {IMAGE!r} and {STATE!r}, "
        f"got {observation_space}"
    )
