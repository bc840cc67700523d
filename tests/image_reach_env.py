"""ImageReach: a small image task for end-to-end CNN tests, with the driving envs' contract.

A point moves in the square [-1, 1]^2 toward a target that only the camera image shows; the
state vector holds the point's own position. Reward is minus the distance to the target each
step; reaching it (distance < `REACH`) terminates; the time limit truncates. A policy that ignores
the image can do no better than wait in the middle (about -15 over 20 steps); one that reads
the target's pixel position gets above -5.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

SIZE = 24  # image height and width, pixels
STEP = 0.25  # distance moved per step at full action
REACH = 0.15


class ImageReach(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self):
        self.observation_space = gym.spaces.Dict(
            {
                "image": gym.spaces.Box(0, 255, (1, SIZE, SIZE), np.uint8),
                "state": gym.spaces.Box(-1.0, 1.0, (2,), np.float32),
            }
        )
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._target = self.np_random.uniform(-0.8, 0.8, 2)
        self._position = self.np_random.uniform(-1.0, 1.0, 2)
        image = np.zeros((1, SIZE, SIZE), np.uint8)
        row, col = np.round((self._target + 1.0) / 2.0 * (SIZE - 1)).astype(int)
        image[0, max(row - 1, 0) : row + 2, max(col - 1, 0) : col + 2] = 255
        self._image = image
        return self._obs(), {}

    def step(self, action):
        move = np.clip(np.asarray(action, np.float64), -1.0, 1.0) * STEP
        self._position = np.clip(self._position + move, -1.0, 1.0)
        distance = float(np.linalg.norm(self._position - self._target))
        return self._obs(), -distance, distance < REACH, False, {"distance": distance}

    def _obs(self):
        return {"image": self._image.copy(), "state": self._position.astype(np.float32)}


def register(max_episode_steps: int = 20) -> str:
    env_id = "ImageReach-v0"
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=ImageReach, max_episode_steps=max_episode_steps)
    return env_id


# Registered on import too: a run in another process names it "tests.image_reach_env:ImageReach-v0".
register()
