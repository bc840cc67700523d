"""A policy's episodes on fixed seeds: how the trained policy and the baselines are compared.

    result = evaluate(env_id, env_kwargs, policy, seeds=range(1000, 1010))
    result.return_mean, result.length_mean, result.ends["collision"], result.speed_mean
    result.driving_score_mean, result.infractions["collision_vehicle"]   (envs that drive routes)

`policy(observation) -> action`: a baseline of carla_env/controllers.py, or `trained_policy(
checkpoint)`, the deterministic actor of a run's checkpoint (no exploration noise). The same
seeds give the same traffic to every policy, so the numbers compare like for like.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

Policy = Callable[[object], np.ndarray]
MODULE_IN_CHECKPOINT = Path("learner_group") / "learner" / "rl_module" / "default_policy"


@dataclass
class EvalResult:
    returns: list[float]
    lengths: list[int]
    ends: dict[str, float] = field(default_factory=dict)  # fraction of episodes per episode_end
    speed_mean: float | None = None  # m/s over all steps, for envs that report speed_mps
    # The leaderboard's route metrics per episode (carla_env/driving_score.py); empty for envs
    # without routes.
    driving_scores: list[float] = field(default_factory=list)
    route_completions: list[float] = field(default_factory=list)
    infractions: dict[str, float] = field(default_factory=dict)  # per episode, mean by kind

    @property
    def driving_score_mean(self) -> float | None:
        return float(np.mean(self.driving_scores)) if self.driving_scores else None

    @property
    def route_completion_mean(self) -> float | None:
        return float(np.mean(self.route_completions)) if self.route_completions else None

    @property
    def return_mean(self) -> float:
        return float(np.mean(self.returns))

    @property
    def length_mean(self) -> float:
        return float(np.mean(self.lengths))

    def row(self) -> dict[str, float]:
        return {"return": self.return_mean, "return_std": float(np.std(self.returns)), "length": self.length_mean,
                **{f"end_{k}": v for k, v in sorted(self.ends.items())},
                **({"speed_mps": self.speed_mean} if self.speed_mean is not None else {}),
                **({"driving_score": self.driving_score_mean, "route_completion": self.route_completion_mean,
                    **{f"infractions_{k}": v for k, v in self.infractions.items()}} if self.driving_scores else {})}


def evaluate(env_id: str, env_kwargs: dict, policy: Policy, seeds: Iterable[int],
             max_episode_steps: int | None = None) -> EvalResult:
    env = gym.make(env_id, max_episode_steps=max_episode_steps, **env_kwargs)
    returns, lengths, ends, speeds = [], [], Counter(), []
    scores, completions, infractions = [], [], Counter()
    try:
        for seed in seeds:
            obs, _ = env.reset(seed=seed)
            total, steps, done, info = 0.0, 0, False, {}
            while not done:
                obs, reward, terminated, truncated, info = env.step(policy(obs))
                total, steps, done = total + float(reward), steps + 1, terminated or truncated
                if "speed_mps" in info:
                    speeds.append(info["speed_mps"])
            returns.append(total)
            lengths.append(steps)
            ends[info.get("episode_end") or ("terminated" if terminated else "truncated")] += 1
            if "route_progress" in info and "driving_score" not in info:
                raise ValueError(
                    f"{env_id}: an episode was cut before the env ended it (env.max_episode_steps "
                    f"{max_episode_steps} is shorter than its episode.max_seconds), so it has no driving "
                    "score: leave env.max_episode_steps unset for driving envs"
                )
            if "driving_score" in info:
                scores.append(info["driving_score"])
                completions.append(info["route_completion"])
                infractions.update(info["infractions"])
    finally:
        env.close()
    n = len(returns)
    return EvalResult(returns, lengths, {k: v / n for k, v in ends.items()},
                      float(np.mean(speeds)) if speeds else None,
                      scores, completions, {k: v / n for k, v in infractions.items()})


def trained_policy(checkpoint: str | Path) -> Policy:
    """The deterministic actor of a checkpoint (`forward_inference`: no noise, no warm-up)."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    return module_policy(RLModule.from_checkpoint(Path(checkpoint) / MODULE_IN_CHECKPOINT))


def module_policy(module) -> Policy:
    """The deterministic actor of an RL module (a checkpoint's, or an env runner's)."""
    module.eval()

    def to_batch(x):
        if isinstance(x, dict):
            return {k: to_batch(v) for k, v in x.items()}
        t = torch.as_tensor(np.asarray(x)[None])
        return t.float() if t.is_floating_point() else t

    def act(obs) -> np.ndarray:
        with torch.no_grad():
            return module.forward_inference({"obs": to_batch(obs)})["actions"][0].numpy()

    return act
