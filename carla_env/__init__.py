"""Driving environments with one observation/action contract (carla_env/contract.py).

Registered gymnasium ids (the `carla_env:` prefix makes gymnasium import this package first,
in every process, Ray's env runners included):

    carla_env:EmbeddedDriving-v0   highway-env, no server: the default (carla_env/embedded.py)
"""

import gymnasium as gym

from carla_env.config import DrivingEnvConfig, EmbeddedEnvConfig

# Each driving env's kwargs schema, for validating `env.kwargs` at config load.
ENV_CONFIGS: dict[str, type[DrivingEnvConfig]] = {"EmbeddedDriving-v0": EmbeddedEnvConfig}

if "EmbeddedDriving-v0" not in gym.registry:
    gym.register("EmbeddedDriving-v0", entry_point="carla_env.embedded:EmbeddedDrivingEnv")
