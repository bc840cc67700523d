"""The observation/action contract both driving backends share.

A backend measures the world (`Measurements`) and renders a frame; everything the policy and the
learner see is derived here and in reward.py, the same way for CARLA and for the embedded env.

- Action: Box([-1, 1]^2) = [steer, throttle_minus_brake]. steer > 0 turns right (towards +y in
  the road's frame, CARLA's convention); throttle_minus_brake > 0 accelerates, < 0 brakes.
- Observation: {"image": uint8 (frame_stack, height, width), oldest frame first,
                "state": float32 `state_features(config)`, scaled to about [-1, 1] when driving normally}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from carla_env.config import DrivingEnvConfig

STEER, THROTTLE_BRAKE = 0, 1
ACTION_SPACE = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
STATE_LIMIT = 10.0  # state features are clipped to +-this (e.g. far off the road)


@dataclass(frozen=True)
class Measurements:
    """What a backend measures about the ego car after a tick. Lateral values are metres in the
    route's (or car's) frame, positive to the right; angles in radians."""

    speed_mps: float
    lateral_offset_m: float  # from the route's (lane's) centre line
    heading_error_rad: float  # car heading minus route heading, wrapped to [-pi, pi]
    lane_width_m: float
    lookahead_lateral_m: tuple[float, ...]  # route points ahead (StateSection.lookahead_m), car frame
    front_gap_m: float  # to the nearest vehicle ahead in the lane; inf if none
    # How fast that gap shrinks (ego minus front car, along the route); 0 if none. A gap alone
    # cannot tell a car stopped ahead from one driving away.
    front_closing_mps: float
    collided: bool  # a collision happened during this tick
    on_route: bool  # still on the road / near the route
    # The route's metrics (carla_env/driving_score.py). A backend without a route of known
    # length leaves the defaults: its episodes report no route completion or driving score.
    route_progress_m: float = 0.0  # metres along the route from the episode's start
    route_length_m: float = math.inf
    # Whether reaching the route's end is arriving (the episode ends: the town, CARLA), or the
    # route is only a yardstick for route completion (the highway: the time limit ends it).
    route_has_destination: bool = True
    collided_with: str = "vehicle"  # what this tick's collision hit: vehicle, static, pedestrian
    off_road: bool = False  # not on any drivable lane
    wrong_lane: bool = False  # on a lane the route does not use (e.g. the oncoming one)

    @property
    def forward_speed_mps(self) -> float:
        """Speed along the route: sideways or backwards driving earns no progress."""
        return self.speed_mps * float(np.cos(self.heading_error_rad))


def wrap_angle(angle: float) -> float:
    """An angle in radians, wrapped to [-pi, pi)."""
    return (angle + np.pi) % (2.0 * np.pi) - np.pi


def car_axes(heading_rad: float) -> tuple[np.ndarray, np.ndarray]:
    """Forward and right unit vectors (x, y) of a heading. Both backends' y axis points right
    of +x (CARLA's left-handed world, highway-env's screen coordinates)."""
    return (
        np.array([np.cos(heading_rad), np.sin(heading_rad)]),
        np.array([-np.sin(heading_rad), np.cos(heading_rad)]),
    )


def state_features(config: DrivingEnvConfig) -> list[str]:
    ahead = [lookahead_feature(d) for d in config.state.lookahead_m]
    return [
        "speed",
        "prev_steer",
        "prev_throttle_brake",
        "lateral_offset",
        "heading_error",
        *ahead,
        "front_gap",
        "front_closing",
    ]


def state_index(config: DrivingEnvConfig) -> dict[str, int]:
    """Each state feature's position in the state vector, by name."""
    return {name: i for i, name in enumerate(state_features(config))}


def lookahead_feature(distance_m: float) -> str:
    return f"route_lateral_at_{distance_m:g}m"


def observation_space(config: DrivingEnvConfig) -> gym.spaces.Dict:
    cam = config.camera
    return gym.spaces.Dict(
        {
            "image": gym.spaces.Box(0, 255, (cam.frame_stack, cam.height, cam.width), np.uint8),
            "state": gym.spaces.Box(
                -STATE_LIMIT, STATE_LIMIT, (len(state_features(config)),), np.float32
            ),
        }
    )


def state_vector(m: Measurements, prev_action: np.ndarray, config: DrivingEnvConfig) -> np.ndarray:
    """`state_features(config)` in order, scaled so that normal driving stays within about [-1, 1]."""
    half_lane = m.lane_width_m / 2.0
    gap_range = config.state.front_gap_range_m
    features = np.array(
        [
            m.speed_mps / config.state.target_speed_mps,
            prev_action[STEER],
            prev_action[THROTTLE_BRAKE],
            m.lateral_offset_m / half_lane,
            m.heading_error_rad / np.pi,
            *(lat / m.lane_width_m for lat in m.lookahead_lateral_m),
            min(m.front_gap_m, gap_range) / gap_range,
            m.front_closing_mps / config.state.target_speed_mps if m.front_gap_m < gap_range else 0.0,
        ],
        dtype=np.float32,
    )
    return np.clip(features, -STATE_LIMIT, STATE_LIMIT)
