"""Torch networks for the TD3 actor-critic (plain torch, no RLlib)."""

from models.actor_critic import Actor, TwinQ
from models.encoders import IMAGE, STATE, FlattenEncoder, ImageStateEncoder, build_encoder
from models.mlp import ACTIVATIONS, mlp

__all__ = [
    "ACTIVATIONS",
    "IMAGE",
    "STATE",
    "Actor",
    "FlattenEncoder",
    "ImageStateEncoder",
    "TwinQ",
    "build_encoder",
    "mlp",
]
