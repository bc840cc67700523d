"""A stand-in for a CARLA server in synchronous mode: each step takes a fixed wall time without
using the CPU (`time.sleep`, as a client waits on the server's tick), and returns a camera stack
and a state vector shaped like the driving envs' (carla_env/contract.py). The content is
noise: the benchmark measures throughput, not learning.

Named "benchmarks.tick_env:TickCamera-v0" from another process (registered on import).
"""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np

ENV_ID = "TickCamera-v0"


class TickCamera(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, tick_s: float = 0.03, width: int = 48, height: int = 48, frame_stack: int = 2,
                 state_dim: int = 10, episode_steps: int = 200):
        self.tick_s, self.episode_steps = tick_s, episode_steps
        self.observation_space = gym.spaces.Dict({
            "image": gym.spaces.Box(0, 255, (frame_stack, height, width), np.uint8),
            "state": gym.spaces.Box(-1.0, 1.0, (state_dim,), np.float32),
        })
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._steps = 0
        self._frames = [self._frame()] * self.observation_space["image"].shape[0]
        return self._obs(), {}

    def step(self, action):
        time.sleep(self.tick_s)
        self._steps += 1
        self._frames = [*self._frames[1:], self._frame()]  # a sliding stack, as the driving envs keep
        reward = -float(np.square(action).sum())
        return self._obs(), reward, False, self._steps >= self.episode_steps, {}

    def _frame(self) -> np.ndarray:
        return self.np_random.integers(0, 256, self.observation_space["image"].shape[1:], np.uint8)

    def _obs(self) -> dict:
        state = self.np_random.uniform(-1.0, 1.0, self.observation_space["state"].shape).astype(np.float32)
        return {"image": np.stack(self._frames), "state": state}


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point=TickCamera)
