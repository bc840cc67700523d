"""Simple driving policies on the contract's observation: the baselines a learned policy must beat.

- `random_policy`: uniform actions.
- `constant_policy([0, 0])`: no steering, no throttle or brake: keep the lane and the speed.
- `LaneKeepingController`: what a few lines of control theory do with the state vector alone.
  Steering is proportional to the lateral offset, the heading error and the route ahead (a
  pure-pursuit-like rule). Speed follows the Intelligent Driver Model (Treiber et al. 2000): reach
  the target speed, and keep a time gap to the car in front, as highway-env's own IDM cars do.
  It never changes lanes.
- `RouteFollowingController`: for routes through junctions and bends (the embedded town). Pure
  pursuit (Coulter 1992) steers towards a route point ahead; the speed is the IDM's, towards a
  target that drops before a bend or turn (a lateral acceleration limit on the route's curvature
  ahead). Cars on the route ahead, crossing or turning into it at a junction included, are what
  the IDM keeps its gap to: that is how it yields.

Each is `policy(observation) -> action`, on the observation of carla_env/contract.py.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from carla_env.config import DrivingEnvConfig, EmbeddedTownConfig
from carla_env.contract import ACTION_SPACE, lookahead_feature, state_index

Policy = Callable[[dict], np.ndarray]


def random_policy(seed: int = 0) -> Policy:
    rng = np.random.default_rng(seed)
    return lambda obs: rng.uniform(ACTION_SPACE.low, ACTION_SPACE.high).astype(np.float32)


def constant_policy(action=(0.0, 0.0)) -> Policy:
    action = np.asarray(action, np.float32)
    return lambda obs: action


class LaneKeepingController:
    """Lane keeping on the route and IDM speed keeping; the gains were tuned on the embedded env.

    steer = -(lateral_gain * offset / half lane + heading_gain * heading error / pi
              - lookahead_gain * route lateral at the first lookahead / lane width)
    accel = max_accel * (1 - (v / v_target)^4 - (s* / gap)^2),
    s* = min_gap + v * time_gap + v * closing / (2 sqrt(max_accel * comfortable_brake))
    """

    def __init__(
        self,
        config: DrivingEnvConfig,
        lateral_gain: float = 0.4,
        heading_gain: float = 3.0,
        lookahead_gain: float = 0.3,
        max_accel_mps2: float = 3.0,
        full_throttle_mps2: float = 5.0,  # highway-env: acceleration range +-5 m/s^2
        time_gap_s: float = 1.5,
        min_gap_m: float = 10.0,
        comfortable_brake_mps2: float = 5.0,
    ):
        self._i = state_index(config)
        self._ahead = lookahead_feature(config.state.lookahead_m[0])
        self.config = config
        self.gains = (lateral_gain, heading_gain, lookahead_gain)
        self.max_accel, self.full_throttle = max_accel_mps2, full_throttle_mps2
        self.time_gap, self.min_gap, self.brake = time_gap_s, min_gap_m, comfortable_brake_mps2

    def __call__(self, obs: dict) -> np.ndarray:
        s, i = obs["state"], self._i
        lateral_gain, heading_gain, lookahead_gain = self.gains
        steer = -(lateral_gain * s[i["lateral_offset"]] + heading_gain * s[i["heading_error"]]
                  - lookahead_gain * s[i[self._ahead]])
        state = self.config.state
        speed, gap, closing = speed_and_gap(s, i, state)
        accel = idm_accel(speed, state.target_speed_mps, gap, closing, self.max_accel, self.brake, self.time_gap, self.min_gap)
        return np.clip(np.array([steer, accel / self.full_throttle], np.float32), -1.0, 1.0)


def speed_and_gap(s: np.ndarray, i: dict[str, int], state) -> tuple[float, float, float]:
    """Speed, gap to the car ahead (inf: none in range) and closing speed, from a state vector."""
    gap_scaled = s[i["front_gap"]]
    gap = np.inf if gap_scaled >= 1.0 else max(gap_scaled * state.front_gap_range_m, 0.1)
    return s[i["speed"]] * state.target_speed_mps, gap, s[i["front_closing"]] * state.target_speed_mps


def idm_accel(speed: float, target: float, gap: float, closing: float, max_accel: float, brake: float,
              time_gap: float, min_gap: float) -> float:
    """The Intelligent Driver Model's acceleration (Treiber et al. 2000)."""
    wanted_gap = min_gap + max(speed * time_gap + speed * closing / (2 * np.sqrt(max_accel * brake)), 0.0)
    return max_accel * (1.0 - (speed / max(target, 0.1)) ** 4 - (wanted_gap / gap) ** 2)


class RouteFollowingController:
    """Pure pursuit on the route's look-ahead points, IDM speed with a curvature limit.

    steer = atan(wheelbase * 2 y / d^2) / max_steer, y: the route's lateral offset d metres ahead
    target speed = min(v_target, sqrt(max_lateral_accel / curvature)), curvature = 2 y_far / d_far^2
    """

    def __init__(
        self,
        config: EmbeddedTownConfig,  # the steering range and lane width give the state its meaning
        pursuit_index: int = 1,  # which look-ahead point to steer at
        wheelbase_m: float = 5.0,  # highway-env's car: its kinematic model turns about its length
        max_lateral_accel_mps2: float = 2.0,
        max_accel_mps2: float = 3.0,
        full_throttle_mps2: float = 5.0,
        time_gap_s: float = 1.0,
        min_gap_m: float = 4.0,
        comfortable_brake_mps2: float = 4.0,
    ):
        self._i = state_index(config)
        self._lookahead = [(self._i[lookahead_feature(d)], d) for d in config.state.lookahead_m]
        self.config = config
        self.pursuit = self._lookahead[min(pursuit_index, len(self._lookahead) - 1)]
        self.wheelbase, self.max_steer = wheelbase_m, np.radians(config.max_steer_deg)
        self.lateral_accel, self.max_accel, self.full_throttle = max_lateral_accel_mps2, max_accel_mps2, full_throttle_mps2
        self.time_gap, self.min_gap, self.brake = time_gap_s, min_gap_m, comfortable_brake_mps2

    def __call__(self, obs: dict) -> np.ndarray:
        s, i, state = obs["state"], self._i, self.config.state
        lane = self.config.lane_width_m
        index, d = self.pursuit
        y = s[index] * lane
        steer = np.arctan(self.wheelbase * 2.0 * y / d**2) / self.max_steer
        curvature = max(abs(2.0 * s[k] * lane / dist**2) for k, dist in self._lookahead)
        target = min(state.target_speed_mps, np.sqrt(self.lateral_accel / max(curvature, 1e-6)))
        speed, gap, closing = speed_and_gap(s, i, state)
        accel = idm_accel(speed, target, gap, closing, self.max_accel, self.brake, self.time_gap, self.min_gap)
        return np.clip(np.array([steer, accel / self.full_throttle], np.float32), -1.0, 1.0)
