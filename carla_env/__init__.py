"""Driving environments with one observation/action contract (carla_env/contract.py).

Registered gymnasium ids (the `carla_env:` prefix makes gymnasium import this package first,
in every process, Ray's env runners included):

    carla_env:EmbeddedDriving-v0   highway-env's highway, no server: the default (carla_env/embedded.py)
    carla_env:EmbeddedTown-v0      a town of junctions and bends on highway-env (carla_env/town.py)
    carla_env:CarlaDriving-v0      a CARLA 0.9.16 server, managed or external (carla_driving.py)
"""

import gymnasium as gym

from carla_env.config import CarlaEnvConfig, DrivingEnvConfig, EmbeddedEnvConfig, EmbeddedTownConfig

# Each driving env's kwargs schema, for validating `env.kwargs` at config load.
ENV_CONFIGS: dict[str, type[DrivingEnvConfig]] = {
    "EmbeddedDriving-v0": EmbeddedEnvConfig,
    "EmbeddedTown-v0": EmbeddedTownConfig,
    "CarlaDriving-v0": CarlaEnvConfig,
}
ENTRY_POINTS = {
    "EmbeddedDriving-v0": "carla_env.embedded:EmbeddedDrivingEnv",
    "EmbeddedTown-v0": "carla_env.town:EmbeddedTownEnv",
    "CarlaDriving-v0": "carla_env.carla_driving:CarlaDrivingEnv",
}

for _env_id, _entry_point in ENTRY_POINTS.items():
    if _env_id not in gym.registry:
        gym.register(_env_id, entry_point=_entry_point)


def driving_env_schema(env_id: str) -> type[DrivingEnvConfig] | None:
    """The kwargs schema of a driving env id (with or without the `carla_env:` prefix); None
    for any other env."""
    return ENV_CONFIGS.get(gym.spec(env_id.rpartition(":")[2]).id)
