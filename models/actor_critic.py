"""TD3's networks: a deterministic actor and a twin-Q critic, each an encoder plus MLP head(s).

The encoder/head split is what gradient clipping and its metrics address (`actor.encoder`,
`actor.head`, `critic.encoder`, `critic.head`). The two Q heads share one critic encoder, as in
DrQ-v2: the min over two heads fights overestimation; two CNNs would double the cost for that.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from models.mlp import mlp


class Actor(nn.Module):
    """observation -> action in [-1, 1]^act_dim (tanh output).

    With `detach_encoder`, the encoder is the critic's (DrQ-v2): the actor reads its features
    but its loss never trains it.
    """

    def __init__(
        self,
        encoder: nn.Module,
        act_dim: int,
        hidden: Sequence[int],
        activation: str,
        detach_encoder: bool = False,
    ):
        super().__init__()
        self.encoder = encoder
        self.detach_encoder = detach_encoder
        self.head = mlp([encoder.out_dim, *hidden, act_dim], activation)

    def forward(self, obs) -> torch.Tensor:
        features = self.encoder(obs)
        if self.detach_encoder:
            features = features.detach()
        return torch.tanh(self.head(features))


class TwinQ(nn.Module):
    """(observation, action) -> (Q1, Q2), each of shape (batch,)."""

    def __init__(self, encoder: nn.Module, act_dim: int, hidden: Sequence[int], activation: str):
        super().__init__()
        self.encoder = encoder
        self.q1_head = mlp([encoder.out_dim + act_dim, *hidden, 1], activation)
        self.q2_head = mlp([encoder.out_dim + act_dim, *hidden, 1], activation)

    def forward(self, obs, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.encoder(obs), action)

    def heads(self, features: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q1, Q2) from already encoded observations."""
        x = torch.cat([features, action], dim=-1)
        return self.q1_head(x).squeeze(-1), self.q2_head(x).squeeze(-1)

    def q1(self, features: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Q1 alone, from encoded observations: the actor's objective."""
        return self.q1_head(torch.cat([features, action], dim=-1)).squeeze(-1)
