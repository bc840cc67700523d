"""Encoders: observation -> feature vector. The part of each network before its MLP head.

- `FlattenEncoder` for vector observations (Pendulum, MuJoCo): no parameters.
- `ImageStateEncoder` for driving observations, a dict of
    `image`: uint8 (frames, height, width), channels-first, the last k camera frames stacked;
    `state`: float32 (n,), speed, previous action, route features...
  The image goes through a CNN and a projection to `feature_dim`; the state vector is appended.

Observations are checked on every forward pass: a channels-last or float image would otherwise
broadcast or convert silently into garbage features.
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
        image, state = obs[IMAGE], obs[STATE]
        self._check(image, state)
        pixels = image.float().mul_(1.0 / 255.0)  # to [0, 1] here; in place: one pass, one copy
        features = self.projection(self.conv(pixels))
        return torch.cat([features, state.float()], dim=-1)

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
