"""Uniform replay of single transitions, in preallocated numpy arrays used as a ring.

RLlib's `EpisodeReplayBuffer` slices `SingleAgentEpisode` objects in Python on every sample;
on 2 cores that was 40% of an update (../shared/notes). TD3 replays single transitions, so we
flatten episodes once, when they arrive, and sampling is one fancy-index per column.

Observations may be arrays or (nested) dicts of arrays (image + state); each leaf gets its own
array, keeping its dtype (uint8 images stay uint8).

Checkpoints save the buffer incrementally (`save`, `load`): each save writes only the rows added
since the previous one, as a chunk folder of .npy files that every later checkpoint shares.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import tree
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from rl.durable import publish


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
        # Rows are numbered by the order they were added: row r lives in slot r % capacity while
        # it is one of the newest `size`. Saved chunks: (first row, end row, folder name).
        self._added = 0
        self._saved_upto = 0
        self._chunks: list[tuple[int, int, str]] = []
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
            self._added += n - self.capacity
            n = self.capacity
        if self._columns is None:
            self._allocate(batch)
        idx = (self._next + np.arange(n)) % self.capacity
        tree.map_structure(lambda column, x: column.__setitem__(idx, x), self._columns, batch)
        self._next = (self._next + n) % self.capacity
        self._size = min(self._size + n, self.capacity)
        self._added += n

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

    def save(self, directory: Path) -> dict[str, Any]:
        """Writes the rows added since the last save into `directory` and returns the manifest a
        checkpoint keeps: the counters, the sampling RNG, and the chunks that hold the rows now
        in the buffer (older chunks are shared, not rewritten). Streams from the ring (np.save of
        views): writing needs no second copy of the buffer in memory."""
        first = self._added - self._size  # the oldest row still in the buffer
        start = max(self._saved_upto, first)
        while start < self._added:  # one chunk per contiguous run of slots
            slot = start % self.capacity
            end = min(self._added, start + self.capacity - slot)
            name = f"rows_{start:013d}_{end:013d}"
            _write_chunk(Path(directory), name, {
                path: column[slot : slot + end - start] for path, column in self._leaves().items()
            })
            self._chunks.append((start, end, name))
            start = end
        self._saved_upto = self._added
        self._chunks = [chunk for chunk in self._chunks if chunk[1] > first]
        return {
            "capacity": self.capacity,
            "added": self._added,
            "size": self._size,
            "chunks": [name for _, _, name in self._chunks],
            "reward_range": list(self._reward_range),
            "reward_abs": [self._reward_abs_sum, self._rewards_seen],
            "rng": self._rng.bit_generator.state,
        }

    def load(self, directory: Path, manifest: dict[str, Any]) -> None:
        """Restores the buffer a `save` described, reading its chunks from `directory`."""
        if manifest["capacity"] != self.capacity:
            raise ValueError(
                f"the checkpoint's replay buffer holds {manifest['capacity']:,} transitions, this "
                f"run's algo.buffer_size is {self.capacity:,}: resume with the run's own config"
            )
        self._columns, self._chunks = None, []
        self._added, self._size = manifest["added"], manifest["size"]
        first = self._added - self._size
        for name in manifest["chunks"]:
            start, end = (int(x) for x in name.split("_")[1:])
            leaves = {
                path: np.load(Path(directory) / name / f"{path}.npy", mmap_mode="r")
                for path in json.loads((Path(directory) / name / CHUNK_LEAVES).read_text())
            }
            if self._columns is None:
                self._allocate(_unflatten(leaves))
            skip = max(0, first - start)  # rows of the chunk overwritten since it was saved
            slot = (start + skip) % self.capacity
            for path, column in self._leaves().items():
                column[slot : slot + end - start - skip] = leaves[path][skip:]
            self._chunks.append((start, end, name))
        self._next = self._added % self.capacity
        self._saved_upto = self._added
        self._reward_range = tuple(manifest["reward_range"])
        self._reward_abs_sum, self._rewards_seen = manifest["reward_abs"]
        self._rng.bit_generator.state = manifest["rng"]

    def _leaves(self) -> dict[str, np.ndarray]:
        """The ring's arrays by their path in the columns ("obs/image", "actions", ...)."""
        if self._columns is None:
            return {}
        return {"/".join(map(str, path)): column for path, column in tree.flatten_with_path(self._columns)}

    def sample(self, num_items: int) -> dict[str, Any]:
        """`num_items` transitions drawn uniformly, with replacement, as a dict of columns."""
        if self._size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = self._rng.integers(0, self._size, size=num_items)
        return tree.map_structure(lambda column: column[idx], self._columns)


CHUNK_LEAVES = "leaves.json"  # a chunk's column paths, written last: the chunk is complete


def _write_chunk(directory: Path, name: str, leaves: dict[str, np.ndarray]) -> None:
    """One chunk folder, made under a temporary name and renamed once every file is on disk."""
    partial = directory / f".partial-{name}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for path, rows in leaves.items():
            (partial / path).parent.mkdir(parents=True, exist_ok=True)
            np.save(partial / f"{path}.npy", rows)
        (partial / CHUNK_LEAVES).write_text(json.dumps(list(leaves)))
        publish(partial, directory / name)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _unflatten(leaves: dict[str, np.ndarray]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for path, value in leaves.items():
        *parents, last = path.split("/")
        node = nested
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return nested
