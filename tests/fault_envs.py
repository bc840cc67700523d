"""Envs with one thing broken, for the fault-injection tests (tests/test_health_faults.py)."""

import gymnasium as gym

SCALED_PENDULUM = "ScaledRewardPendulum-v0"


def _scaled_pendulum(scale: float = 1000.0, **kwargs):
    return gym.wrappers.TransformReward(gym.make("Pendulum-v1", **kwargs), lambda r: scale * r)


def register() -> str:
    """Pendulum whose rewards are `scale` times what its documented bounds say."""
    if SCALED_PENDULUM not in gym.registry:
        gym.register(SCALED_PENDULUM, entry_point=_scaled_pendulum, max_episode_steps=200)
    return SCALED_PENDULUM
