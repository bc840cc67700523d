"""Shared test helpers: a standalone TD3 learner and batches of random transitions."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

from rl.config import ModelSection
from rl.td3 import TD3Config
from rl.td3.td3_rl_module import TD3TorchRLModule

ACTION_SPACE = gym.spaces.Box(-1, 1, (2,), np.float32)
# Small networks keep learner tests fast; the architecture is the production one.
SMALL_MODEL = {
    "actor_hidden": [16],
    "critic_hidden": [16],
    "cnn": {"channels": [4, 8], "kernel_sizes": [3, 3], "strides": [2, 2], "feature_dim": 8},
}


def vector_space(dim: int = 3) -> gym.spaces.Box:
    return gym.spaces.Box(-1, 1, (dim,), np.float32)


def image_state_space(frames: int = 2, size: int = 16, state_dim: int = 3) -> gym.spaces.Dict:
    return gym.spaces.Dict(
        {
            "image": gym.spaces.Box(0, 255, (frames, size, size), np.uint8),
            "state": gym.spaces.Box(-np.inf, np.inf, (state_dim,), np.float32),
        }
    )


def td3_learner(
    observation_space: gym.Space,
    action_space: gym.Space = ACTION_SPACE,
    module_class: type = TD3TorchRLModule,
    model: dict | None = None,
    gpus: int = 0,
    **training,
):
    """A built `TD3TorchLearner` (no Ray, no env) for the given spaces; on a GPU with gpus=1."""
    config = (
        TD3Config()
        .environment(observation_space=observation_space, action_space=action_space)
        .training(**training)
        .rl_module(
            rl_module_spec=RLModuleSpec(module_class=module_class),
            model_config={**SMALL_MODEL, **(model or {})},
        )
        .learners(num_gpus_per_learner=gpus)
        .debugging(seed=0)
    )
    return config.build_learner()


def td3_module(
    observation_space: gym.Space,
    action_space: gym.Space = ACTION_SPACE,
    inference_only: bool = False,
    **model_config,
) -> TD3TorchRLModule:
    """A standalone module with the default model config, SMALL_MODEL and `model_config` on top."""
    defaults = ModelSection().model_dump() | {"exploration_noise": 0.1, "learning_starts": 0}
    return TD3TorchRLModule(
        observation_space=observation_space,
        action_space=action_space,
        inference_only=inference_only,
        model_config=defaults | SMALL_MODEL | model_config,
    )


def random_obs(space: gym.Space, n: int, rng: np.random.Generator):
    """n observations drawn from the space (images uniformly over 0..255)."""
    if isinstance(space, gym.spaces.Dict):
        return {key: random_obs(sub, n, rng) for key, sub in space.spaces.items()}
    if space.dtype == np.uint8:
        return rng.integers(0, 256, (n, *space.shape), dtype=np.uint8)
    return rng.normal(size=(n, *space.shape)).astype(space.dtype)


def transition_columns(
    observation_space: gym.Space, n: int, act_dim: int = 2, reward_scale: float = 1.0, seed: int = 0
) -> dict:
    rng = np.random.default_rng(seed)
    return {
        Columns.OBS: random_obs(observation_space, n, rng),
        Columns.ACTIONS: rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
        Columns.REWARDS: (reward_scale * rng.normal(size=n)).astype(np.float32),
        Columns.NEXT_OBS: random_obs(observation_space, n, rng),
        Columns.TERMINATEDS: np.zeros(n, np.float32),
    }


def as_batch(columns: dict) -> MultiAgentBatch:
    n = len(columns[Columns.REWARDS])
    return MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(columns)}, env_steps=n)


def run_in_own_group(command: list[str], timeout: float, cwd) -> tuple[int, str, str]:
    """Runs `command` in `cwd`, in a process group of its own (with whatever it starts: Ray,
    servers), and kills the group on any exit: a timeout, a failure, an interrupted test run. The
    child gets this environment without the user's W&B settings and Ray address (a test's run
    never logs to their W&B or joins their cluster). Returns the exit code, stdout and stderr."""
    import os
    import signal
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RAY_ADDRESS"))}
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, out, err
