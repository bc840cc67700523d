"""MLP actor and critic for flat vector observations (Pendulum, MuJoCo).

Each network is an `encoder` (observation -> features) followed by a `head` (features -> output),
so that gradient clipping and metrics can address the two parts separately.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "silu": nn.SiLU}


def mlp(sizes: Sequence[int], activation: str) -> nn.Sequential:
    """Linear layers of the given sizes with `activation` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """Deterministic policy: observation -> action in [-1, 1]^act_dim (tanh output)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], activation: str):
        super().__init__()
        self.encoder = nn.Flatten()
        self.head = mlp([obs_dim, *hidden, act_dim], activation)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(self.encoder(obs)))


class QNetwork(nn.Module):
    """State-action value: (observation, action) -> Q, shape (batch,)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], activation: str):
        super().__init__()
        self.encoder = nn.Flatten()
        self.head = mlp([obs_dim + act_dim, *hidden, 1], activation)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.encoder(obs), action], dim=-1)).squeeze(-1)
