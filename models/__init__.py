"""Torch networks for the TD3 actor-critic (plain torch, no RLlib)."""

from models.mlp import Actor, QNetwork, mlp

__all__ = ["Actor", "QNetwork", "mlp"]
