"""The embedded default backend: highway-env's multi-lane highway with NPC traffic, no server
(the embedded town, carla_env/town.py, shares its `HighwayEnvSimulator`).

highway-env (Farama, on PyPI) simulates the cars and renders a top-down view; this module only
adapts it to our contract (carla_env/contract.py): its camera frame, its ego car's measurements,
and our action order. Its own reward, termination and time limit are not used: `DrivingEnv`
decides those, the same way as for CARLA.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from typing import Any

import numpy as np

from carla_env.config import EmbeddedEnvConfig, HighwayEnvConfig, load_env_config
from carla_env.contract import STEER, THROTTLE_BRAKE, Measurements, car_axes, wrap_angle
from carla_env.driving_env import DrivingEnv

GRAYSCALE_WEIGHTS = [0.2989, 0.5870, 0.1140]  # ITU-R BT.601 luma, as in highway-env's example


@functools.cache
def no_reverse(base: type, max_lateral_accel_mps2: float | None = None) -> type:
    """A highway-env vehicle class whose brakes stop the car and never drive it backwards (its
    own cars reverse at full brake; a CARLA car's reverse is a gear of its own). With
    `max_lateral_accel_mps2`, its tyres also grip only so much: highway-env's kinematic car
    turns as tightly at 30 m/s as at 3, so the steering is limited to the curvature that
    lateral acceleration allows at the car's speed (a car that is too fast for a bend runs wide)."""

    class NoReverse(base):
        MIN_SPEED = 0.0

        def step(self, dt: float) -> None:
            if self.action and self.speed + self.action.get("acceleration", 0.0) * dt < 0.0:
                self.action["acceleration"] = -self.speed / dt
            if self.action and max_lateral_accel_mps2 is not None and self.speed > 1.0:
                # highway-env's model: heading rate = v sin(beta) / (L / 2), tan(beta) = tan(delta) / 2.
                sin_beta = min(1.0, max_lateral_accel_mps2 / self.speed**2 * self.LENGTH / 2)
                max_delta = math.atan(2.0 * math.tan(math.asin(sin_beta)))
                self.action["steering"] = float(np.clip(self.action.get("steering", 0.0), -max_delta, max_delta))
            super().step(dt)

    NoReverse.__name__ = f"NoReverse{base.__name__}"
    return NoReverse


class HighwayEnvSimulator:
    """A highway-env world behind the Simulator protocol: its camera frame, our action order.
    Subclasses build the world (`world_class`, extra highway-env config) and measure the ego car."""

    def __init__(self, config: HighwayEnvConfig, world_class: type, world_config: dict[str, Any]):
        if os.environ.get("SDL_VIDEODRIVER") == "dummy":
            # highway-env turns its renderer off under the dummy driver: every frame is black.
            raise RuntimeError(
                "SDL_VIDEODRIVER=dummy makes highway-env render black frames; unset it "
                "(the embedded env renders off-screen without a display)"
            )
        if not os.environ.get("XDG_RUNTIME_DIR"):
            # Headless machines have none, and SDL then prints an "error:" line per process.
            os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="sdl-runtime-")
        self.config = config
        cam = config.camera
        self._env = world_class(
            config={
                "observation": {
                    "type": "GrayscaleObservation",
                    "observation_shape": (cam.width, cam.height),  # highway-env: W x H
                    "stack_size": 1,  # DrivingEnv stacks frames, the same way for both backends
                    "weights": GRAYSCALE_WEIGHTS,
                    "scaling": config.pixels_per_metre,
                },
                "action": {
                    "type": "ContinuousAction",
                    "steering_range": (-math.radians(config.max_steer_deg), math.radians(config.max_steer_deg)),
                },
                "vehicles_count": config.npc_vehicles,
                "simulation_frequency": config.simulation_hz,
                "policy_frequency": config.episode.control_hz,
                "duration": math.inf,  # DrivingEnv owns the time limit
                "offroad_terminal": False,
                **world_config,
            }
        )

    def reset(self, seed: int | None) -> tuple[np.ndarray, Measurements]:
        obs, _ = self._env.reset(seed=seed)
        frame = self._frame(obs)
        if frame.min() == frame.max():
            raise RuntimeError("highway-env rendered a blank first frame: check the pygame install")
        self._start_episode()
        return frame, self._measure()

    def _start_episode(self) -> None:
        """Called after each reset, before the first measurement."""

    def step(self, action: np.ndarray) -> tuple[np.ndarray, Measurements]:
        # highway-env's continuous action is [acceleration, steering], both in [-1, 1].
        obs, *_ = self._env.step(np.array([action[THROTTLE_BRAKE], action[STEER]], np.float32))
        return self._frame(obs), self._measure()

    def health(self) -> dict[str, float]:
        return {}

    def view(self) -> np.ndarray:
        """highway-env's top-down view around the ego car, RGB (150, 600, 3), off-screen."""
        self._env.render_mode = "rgb_array"
        image = self._env.render()
        # render() also turns on drawing every simulation sub-step, which only a window needs.
        self._env.enable_auto_render = False
        return image

    def close(self) -> None:
        self._env.close()

    @staticmethod
    def _frame(obs: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(obs[0].T)  # (1, W, H) -> (H, W)

    def _measure(self) -> Measurements:
        raise NotImplementedError


class HighwaySimulator(HighwayEnvSimulator):
    def __init__(self, config: EmbeddedEnvConfig):
        from highway_env.envs.highway_env import HighwayEnv

        super().__init__(config, HighwayEnv, {"lanes_count": config.lanes})

    def _start_episode(self) -> None:
        car = self._env.vehicle
        car.__class__ = no_reverse(type(car))
        self._start_x = float(car.position[0])

    def _measure(self) -> Measurements:
        """The ego car against its current lane: on a highway, the lane is the route, as long
        as a car at the target speed drives in the episode's time limit."""
        car, road = self._env.vehicle, self._env.road
        lane = road.network.get_lane(car.lane_index)
        s, lateral = lane.local_coordinates(car.position)
        _, right = car_axes(car.heading)
        ahead = tuple(
            float(np.dot(lane.position(s + d, 0.0) - car.position, right))
            for d in self.config.state.lookahead_m
        )
        front, _ = road.neighbour_vehicles(car, car.lane_index)
        gap, closing = math.inf, 0.0
        if front is not None:
            gap = max(0.0, lane.local_coordinates(front.position)[0] - s - car.LENGTH)
            along = np.array([math.cos(lane.heading_at(s)), math.sin(lane.heading_at(s))])
            closing = float(np.dot(car.velocity - front.velocity, along))
        return Measurements(
            speed_mps=float(car.speed),
            lateral_offset_m=float(lateral),
            heading_error_rad=wrap_angle(car.heading - lane.heading_at(s)),
            lane_width_m=float(lane.width_at(s)),
            lookahead_lateral_m=ahead,
            front_gap_m=gap,
            front_closing_mps=closing,
            collided=bool(car.crashed),
            on_route=bool(car.on_road),
            route_progress_m=float(car.position[0]) - self._start_x,
            route_length_m=self.config.state.target_speed_mps * self.config.episode.max_seconds,
            route_has_destination=False,
            off_road=not car.on_road,
        )


class EmbeddedDrivingEnv(DrivingEnv):
    """gymnasium id `carla_env:EmbeddedDriving-v0`; kwargs: EmbeddedEnvConfig's fields."""

    def __init__(self, render_mode: str | None = None, **kwargs: Any):
        config = load_env_config(EmbeddedEnvConfig, kwargs)
        super().__init__(HighwaySimulator(config), config, render_mode)
