"""The TD3 paper's overestimation diagnostic (Fujimoto et al. 2018, Figure 1): the critic's
estimate Q1(s0, a0) at the start of finished training episodes, against the discounted return
those episodes actually got from there.

Episodes arrive in chunks across iterations, so each episode's start and running discounted
return are kept until it ends. A truncated episode (time limit) did not end for the car: its
return gets the critic's value of where it stopped, gamma^T * Q1(s_T, pi(s_T)), like the TD
target does; a terminated one gets nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
import tree
from ray.rllib.core import DEFAULT_MODULE_ID

MAX_OPEN_EPISODES = 10_000  # a bound on memory if episodes never end (or their ends get lost)


@dataclass
class _OpenEpisode:
    obs: Any
    action: np.ndarray
    discounted_return: float = 0.0
    discount: float = 1.0


@dataclass(frozen=True)
class FinishedStart:
    obs: Any
    action: np.ndarray
    discounted_return: float  # without the truncation tail
    discount: float  # gamma^T
    tail_obs: Any | None  # s_T of a truncated episode; None when terminated


class EpisodeStarts:
    def __init__(self, gamma: float):
        self.gamma = gamma
        self._open: dict[str, _OpenEpisode] = {}

    def add(self, episodes: Iterable) -> list[FinishedStart]:
        """Reads sampled episode chunks; returns the episodes that finished in them."""
        finished = []
        for chunk in episodes:
            if chunk.t_started == 0 and chunk.id_ not in self._open and len(self._open) < MAX_OPEN_EPISODES:
                self._open[chunk.id_] = _OpenEpisode(chunk.get_observations(0), chunk.get_actions(0))
            episode = self._open.get(chunk.id_)
            if episode is None:  # started before this run tracked it (e.g. restored from a checkpoint)
                continue
            for reward in chunk.get_rewards():
                episode.discounted_return += episode.discount * float(reward)
                episode.discount *= self.gamma
            if chunk.is_done:
                del self._open[chunk.id_]
                finished.append(
                    FinishedStart(
                        episode.obs,
                        episode.action,
                        episode.discounted_return,
                        episode.discount,
                        chunk.get_observations(-1) if chunk.is_truncated else None,
                    )
                )
        return finished


def _stack(items: list) -> Any:
    return tree.map_structure(lambda *xs: np.stack(xs), *items)


def start_values(learner, starts: list[FinishedStart]) -> tuple[np.ndarray, np.ndarray]:
    """Runs in the learner: (Q1(s0, a0), the discounted returns with their truncation tails)."""
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    device = next(module.parameters()).device

    def to_torch(x):
        # float64 observations (MuJoCo's) as float32, like the learner's batches; uint8 stays.
        def leaf(a):
            t = torch.as_tensor(a)
            return (t.float() if t.is_floating_point() else t).to(device)

        return tree.map_structure(leaf, x)

    with torch.no_grad():
        q_start = module.critic(to_torch(_stack([s.obs for s in starts])), to_torch(_stack([s.action for s in starts])))[0]
        returns = torch.tensor([s.discounted_return for s in starts], dtype=torch.float32, device=device)
        truncated = [i for i, s in enumerate(starts) if s.tail_obs is not None]
        if truncated:
            tail_obs = to_torch(_stack([starts[i].tail_obs for i in truncated]))
            tail_q = module.critic(tail_obs, module.actor(tail_obs))[0]
            discounts = torch.tensor([starts[i].discount for i in truncated], dtype=torch.float32, device=device)
            returns[truncated] += discounts * tail_q
    return q_start.cpu().numpy(), returns.cpu().numpy()
