"""`DrivingEnv`: the gymnasium env both backends share; a backend only supplies a `Simulator`.

The env owns everything the contract promises: the frame stack, the state vector, the reward
terms, and when an episode ends. Collision, leaving the route and being stuck *terminate* (the
car's future is over: no bootstrapping past them), and so does reaching the route's end (the task
is done: nothing more to earn); the time limit *truncates* (the future goes on, only our episode
stops). A step that is both reports terminated only. The episode's last `info` carries the
leaderboard's route metrics where the backend drives a route of known length
(carla_env/driving_score.py).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

from carla_env.config import DrivingEnvConfig
from carla_env.contract import ACTION_SPACE, Measurements, observation_space, state_vector
from carla_env.driving_score import RouteScore
from carla_env.reward import reward_bounds, reward_terms


class SimulatorInterrupted(RuntimeError):
    """The backend lost this episode (server crashed, hung or dropped a sensor frame) and has
    recovered for the next one. The episode is truncated, not terminated: nothing about the
    car's state ended it."""


class Simulator(Protocol):
    """A driving backend: moves the world one control step and measures the ego car."""

    def reset(self, seed: int | None) -> tuple[np.ndarray, Measurements]:
        """A fresh episode: the first camera frame, uint8 (height, width), and measurements."""

    def step(self, action: np.ndarray) -> tuple[np.ndarray, Measurements]:
        """Applies [steer, throttle_minus_brake] for one control step, ticks, measures.
        Raises SimulatorInterrupted when the episode was lost to a backend failure."""

    def health(self) -> dict[str, float]:
        """Backend counters (server restarts, tick timeouts, sim speed-up), cumulative."""

    def close(self) -> None: ...

    # Optional: `view() -> RGB uint8 (H, W, 3)`, a larger view of the scene for people (a top-down
    # or chase view), which `DrivingEnv.render` returns. Backends without one leave it out.


class DrivingEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, simulator: Simulator, config: DrivingEnvConfig, render_mode: str | None = None):
        self.simulator, self.config = simulator, config
        self.render_mode = render_mode
        self.metadata = {**self.metadata, "render_fps": config.episode.control_hz}
        self.observation_space = observation_space(config)
        self.action_space = ACTION_SPACE
        self._frames: deque[np.ndarray] = deque(maxlen=config.camera.frame_stack)
        self._prev_action = np.zeros(2, np.float32)
        self._steps = self._slow_steps = 0
        self._score: RouteScore | None = None

    @property
    def reward_bounds(self) -> tuple[float, float]:
        """(r_min, r_max) of one step's reward; see carla_env/reward.py."""
        return reward_bounds(self.config)

    def backend_health(self) -> dict[str, float]:
        """Counters since the env was made (server restarts, tick timeouts, sim speed-up):
        polled by the callbacks, kept out of `info` so that steps stay deterministic."""
        return self.simulator.health()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        frame, m = self.simulator.reset(seed)
        self._check_frame(frame)
        self._frames.extend([frame] * self.config.camera.frame_stack)
        self._prev_action = np.zeros(2, np.float32)
        self._steps = self._slow_steps = 0
        self._last = m
        self._score = RouteScore(m.route_length_m) if np.isfinite(m.route_length_m) else None
        return self._observation(m), self._info(m, None, None)

    def step(self, action):
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (2,) or not np.all(np.isfinite(action)):
            raise ValueError(f"action must be 2 finite floats [steer, throttle_minus_brake], got {action!r}")
        action = np.clip(action, -1.0, 1.0)
        try:
            frame, m = self.simulator.step(action)
        except SimulatorInterrupted as e:
            # The last observation stands in for the lost one; reward 0, episode truncated.
            info = self._info(self._last, {}, "backend_failure")
            info["backend_failure"] = str(e)
            self._add_route_metrics(info, "backend_failure")
            return self._observation(self._last), 0.0, False, True, info
        self._check_frame(frame)
        self._frames.append(frame)
        self._steps += 1
        self._last = m

        terms = reward_terms(m, action, self._prev_action, self.config)
        reason = self._termination_reason(m)
        terminated = reason is not None
        truncated = not terminated and self._steps >= self.config.episode.max_steps
        self._prev_action = action
        end = reason or ("time_limit" if truncated else None)
        info = self._info(m, terms, end)
        if self._score is not None:
            # Every step: how much of the route is done, and what it did wrong (for videos).
            info["infractions_now"] = self._score.update(m)
            info["route_progress"] = self._score.progress_m / self._score.route_length_m
            if end is not None:
                self._add_route_metrics(info, end)
        return self._observation(m), sum(terms.values()), terminated, truncated, info

    def render(self) -> np.ndarray | None:
        """The backend's view of the scene for people, RGB uint8 (H, W, 3): highway-env's top-down
        view (drawn on request), CARLA's chase camera (an env made with `render_mode="rgb_array"`
        spawns it; it renders every tick). None where there is none: episode videos then show the
        camera frames only (rl/episode_video.py)."""
        view = getattr(self.simulator, "view", None)
        return view() if view is not None else None

    def close(self) -> None:
        self.simulator.close()

    def _termination_reason(self, m: Measurements) -> str | None:
        episode = self.config.episode
        self._slow_steps = self._slow_steps + 1 if m.speed_mps < episode.stuck_speed_mps else 0
        if m.collided:
            return "collision"
        if not m.on_route:
            return "off_route"
        if self._slow_steps >= episode.stuck_seconds * episode.control_hz:
            return "stuck"
        if m.route_has_destination and m.route_progress_m >= m.route_length_m:
            return "route_complete"
        return None

    def _add_route_metrics(self, info: dict, end: str) -> None:
        if self._score is not None:
            info.update(self._score.end(end))

    def _observation(self, m: Measurements) -> dict[str, np.ndarray]:
        return {
            "image": np.stack(self._frames),
            "state": state_vector(m, self._prev_action, self.config),
        }

    def _info(self, m: Measurements, terms: dict | None, end: str | None) -> dict[str, Any]:
        return {
            "reward_terms": terms or {},
            # collision, off_route, stuck, route_complete (terminated); time_limit,
            # backend_failure (truncated)
            "episode_end": end,
            "speed_mps": m.speed_mps,
            "lateral_offset_m": m.lateral_offset_m,
        }

    def _check_frame(self, frame: np.ndarray) -> None:
        cam = self.config.camera
        if frame.dtype != np.uint8 or frame.shape != (cam.height, cam.width):
            raise RuntimeError(
                f"{type(self.simulator).__name__} returned a {frame.dtype} frame of shape "
                f"{frame.shape}; the contract needs uint8 (camera.height, camera.width) = "
                f"({cam.height}, {cam.width})"
            )
