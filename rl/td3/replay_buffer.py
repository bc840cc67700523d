"""Uniform replay of single transitions, in preallocated numpy arrays used as a ring.

RLlib's `EpisodeReplayBuffer` slices `SingleAgentEpisode` objects in Python on every sample;
on 2 cores that was 40% of an update (../shared/notes). TD3 replays single transitions, so we
flatten episodes once, when they arrive, and sampling is one fancy-index per column.

Observations may be arrays or (nested) dicts of arrays (image + state); each leaf gets its own
array, keeping its dtype (uint8 images stay uint8).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import tree
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_episode import SingleAgentEpisode


# The replay buffer may take at most this share of the memory (the rest: Ray, torch, the envs).
MAX_MEMORY_FRACTION = 0.8


def memory_limit_bytes() -> int:
    """Physical memory, or the container's (cgroup) limit when it is lower, as on Kubernetes."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value.isdigit():
            limit = min(limit, int(value))
    return limit


class TransitionReplayBuffer:
    def __init__(self, capacity: int, seed: int | None = None):
        if capacity <= 0:
            raise ValueError(f"replay buffer capacity must be > 0, got {capacity}")
        self.capacity = capacity
        self._rng = np.random.default_rng(seed)
        self._columns: dict[str, Any] | None = None  # allocated on the first add
        self._next = 0  # where the next transition goes
        self._size = 0
        self._reward_range = (np.inf, -np.inf)
        self._reward_abs_sum, self._rewards_seen = 0.0, 0

    def __len__(self) -> int:
        return self._size

    @property
    def reward_range(self) -> tuple[float, float]:
        """The lowest and highest reward ever added (also of transitions since overwritten)."""
        return self._reward_range

    @property
    def reward_abs_mean(self) -> float:
        """The mean |reward| per step over every transition ever added: the run's reward scale."""
        return self._reward_abs_sum / max(self._rewards_seen, 1)

    @property
    def bytes_per_transition(self) -> int:
        """Bytes one stored (and one sampled) transition takes; 0 before the first add."""
        if self._columns is None:
            return 0
        return sum(column[0].nbytes for column in tree.flatten(self._columns))

    def add(
        self,
        obs: Any,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_obs: Any,
        terminateds: np.ndarray,
    ) -> None:
        """Adds n transitions; every argument is batched along axis 0."""
        batch = {
            Columns.OBS: obs,
            Columns.ACTIONS: np.asarray(actions, np.float32),
            Columns.REWARDS: np.asarray(rewards, np.float32),
            Columns.NEXT_OBS: next_obs,
            Columns.TERMINATEDS: np.asarray(terminateds, np.float32),
        }
        n = len(batch[Columns.REWARDS])
        if n == 0:
            return
        rewards = batch[Columns.REWARDS]
        low, high = self._reward_range
        self._reward_range = (min(low, float(rewards.min())), max(high, float(rewards.max())))
        self._reward_abs_sum += float(np.abs(rewards).sum())
        self._rewards_seen += n
        if n > self.capacity:  # only the newest `capacity` transitions can stay
            batch = tree.map_structure(lambda x: x[-self.capacity :], batch)
            n = self.capacity
        if self._columns is None:
            self._allocate(batch)
        idx = (self._next + np.arange(n)) % self.capacity
        tree.map_structure(lambda column, x: column.__setitem__(idx, x), self._columns, batch)
        self._next = (self._next + n) % self.capacity
        self._size = min(self._size + n, self.capacity)

    def _allocate(self, batch: dict[str, Any]) -> None:
        """Allocates the ring for transitions shaped like `batch`, after checking it fits.

        numpy reserves the memory lazily, so an oversized buffer would not fail here but kill the
        run hours later, when the ring fills up: refuse it now, with the numbers."""
        per_transition = sum(x[0].nbytes for x in tree.flatten(batch))
        needed, limit = self.capacity * per_transition, memory_limit_bytes()
        if needed > MAX_MEMORY_FRACTION * limit:
            fits = int(MAX_MEMORY_FRACTION * limit // per_transition)
            raise ValueError(
                f"algo.buffer_size={self.capacity:,} transitions of {per_transition:,} bytes need "
                f"{needed / 2**30:.1f} GiB, but this machine (or container) has "
                f"{limit / 2**30:.1f} GiB; at most about {fits:,} fit in "
                f"{MAX_MEMORY_FRACTION:.0%} of it"
            )
        self._columns = tree.map_structure(
            lambda x: np.empty((self.capacity, *x.shape[1:]), dtype=x.dtype), batch
        )

    def add_episodes(self, episodes: Iterable[SingleAgentEpisode]) -> int:
        """Flattens sampled episode chunks into transitions; returns how many were added.

        A chunk of length n holds n + 1 observations. Only its last step can be terminal; a
        truncated last step is stored as non-terminal so that its target bootstraps.
        """
        added = 0
        for episode in episodes:
            n = len(episode)
            if n == 0:
                continue
            observations = episode.get_observations(slice(0, n + 1))
            terminateds = np.zeros(n, np.float32)
            terminateds[-1] = float(episode.is_terminated)
            self.add(
                obs=tree.map_structure(lambda x: x[:-1], observations),
                actions=episode.get_actions(slice(0, n)),
                rewards=episode.get_rewards(slice(0, n)),
                next_obs=tree.map_structure(lambda x: x[1:], observations),
                terminateds=terminateds,
            )
            added += n
        return added

    def get_state(self) -> dict[str, Any]:
        """For checkpoints: the stored transitions only (not the empty rest of the ring)."""
        filled = None
        if self._columns is not None:
            filled = tree.map_structure(lambda column: column[: self._size].copy(), self._columns)
        return {
            "capacity": self.capacity,
            "columns": filled,
            "next": self._next,
            "size": self._size,
            "reward_range": self._reward_range,
            "reward_abs": (self._reward_abs_sum, self._rewards_seen),
            "rng": self._rng.bit_generator.state,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(
                f"the checkpoint's replay buffer holds {state['capacity']:,} transitions, this run's "
                f"algo.buffer_size is {self.capacity:,}: resume with the run's own config"
            )
        self._columns = None
        if state["columns"] is not None:
            self._allocate(state["columns"])
            tree.map_structure(
                lambda column, saved: column.__setitem__(slice(0, len(saved)), saved),
                self._columns,
                state["columns"],
            )
        self._next, self._size = state["next"], state["size"]
        self._reward_range = tuple(state["reward_range"])
        self._reward_abs_sum, self._rewards_seen = state.get("reward_abs", (0.0, 0))
        self._rng.bit_generator.state = state["rng"]

    def sample(self, num_items: int) -> dict[str, Any]:
        """`num_items` transitions drawn uniformly, with replacement, as a dict of columns."""
        if self._size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = self._rng.integers(0, self._size, size=num_items)
        return tree.map_structure(lambda column: column[idx], self._columns)
