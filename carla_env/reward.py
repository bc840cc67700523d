"""The driving reward: a sum of named, bounded terms, each reported in `info["reward_terms"]`.

    progress        +w * clip(forward_speed / target_speed, 0, 1)       in [0, w]
    lane_centering  -w * min(|lateral_offset| / (lane_width / 2), 1)     in [-w, 0]
    collision       -w on the step the car collides (then terminated)    in {-w, 0}
    off_route       -w on the step the car leaves the road (terminated), in {-w, 0}
                    unless it collides on that step too: an episode pays the penalty of
                    the reason it ended (carla_env/driving_env.py), once
    comfort         -w * |steer - previous steer| / 2                    in [-w, 0]

So every step's reward lies in `reward_bounds(config)`, and a discounted return in
[r_min, r_max] / (1 - gamma): the health monitor checks Q-values against that bound.
"""

from __future__ import annotations

import numpy as np

from carla_env.config import DrivingEnvConfig
from carla_env.contract import STEER, Measurements

TERMS = ("progress", "lane_centering", "collision", "off_route", "comfort")


def reward_terms(
    m: Measurements, action: np.ndarray, prev_action: np.ndarray, config: DrivingEnvConfig
) -> dict[str, float]:
    w = config.reward
    speed_ratio = m.forward_speed_mps / config.state.target_speed_mps
    off_centre = abs(m.lateral_offset_m) / (m.lane_width_m / 2.0)
    steer_change = abs(float(action[STEER]) - float(prev_action[STEER])) / 2.0
    return {
        "progress": w.progress * float(np.clip(speed_ratio, 0.0, 1.0)),
        "lane_centering": -w.lane_centering * min(off_centre, 1.0),
        "collision": -w.collision * float(m.collided),
        "off_route": -w.off_route * float(not m.on_route and not m.collided),
        "comfort": -w.comfort * min(steer_change, 1.0),
    }


def reward_bounds(config: DrivingEnvConfig) -> tuple[float, float]:
    """(r_min, r_max): the lowest and highest reward any single step can give."""
    w = config.reward
    return -(w.lane_centering + max(w.collision, w.off_route) + w.comfort), w.progress
