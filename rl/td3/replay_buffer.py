"""Uniform replay of single transitions, in preallocated numpy arrays used as a ring.

RLlib's `EpisodeReplayBuffer` slices `SingleAgentEpisode` objects in Python on every sample;
on 2 cores that was 40% of an update (../shared/notes). TD3 replays single transitions, so we
flatten episodes once, when they arrive, and sampling is one fancy-index per column.

Observations may be arrays or (nested) dicts of arrays (image + state); each leaf gets its own
array, keeping its dtype. A stacked camera leaf (uint8, (k, H, W)) is not stored as stacks: its
frames go once into a `FrameStore` (rl/td3/frame_store.py) and the transition keeps k frame
numbers for `obs` and k for `next_obs`; `sample` rebuilds the stacks. 84x84x4 frames then cost
about 7.4 KB per transition instead of 56.5 KB.

Rows are numbered in the order they were added (row r lives in slot r % capacity); the buffer
holds the newest `size` of them. A row leaves when the ring wraps over it, or earlier if the
frames it needs are overwritten (episodes so short that frames outnumber transitions by more
than the store's 3% headroom): every row sampled has all its frames.

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
from rl.td3.frame_store import FrameStore
from rl.td3.transition_wire import EpisodeChunk, chunks_of, is_camera_stack_sequence


# The replay buffer may take at most this share of the memory (the rest: Ray, torch, the envs).
MAX_MEMORY_FRACTION = 0.8
# Frames per transition a FrameStore has room for: one per step, plus headroom for the frames
# of episode starts (k - 1 more each, fewer when the env pads with copies of the first frame).
FRAME_HEADROOM_FRACTION, FRAME_HEADROOM_MIN = 1 / 32, 256


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
    # What `stats` says of a buffer nothing was added to.
    EMPTY_STATS = {"size": 0, "added": 0, "reward_range": (np.inf, -np.inf), "reward_abs_sum": 0.0,
                   "rewards_seen": 0, "bytes_per_transition": 0}

    def __init__(self, capacity: int, seed: int | None = None):
        if capacity <= 0:
            raise ValueError(f"replay buffer capacity must be > 0, got {capacity}")
        self.capacity = capacity
        self._rng = np.random.default_rng(seed)
        self._empty()

    def _empty(self) -> None:
        # Allocated on the first add: the per-row arrays (a stacked camera leaf holds frame
        # numbers), and per stacked camera leaf (its path in the observation) its FrameStore and,
        # per slot, the oldest frame this row or any later one needs (non-decreasing by row).
        self._columns: dict[str, Any] | None = None
        self._stores: dict[tuple, FrameStore] = {}
        self._needs: dict[tuple, np.ndarray] = {}
        self._links: dict[Any, dict[tuple, np.ndarray]] = {}  # episode id -> its last stack's frames
        self._added = 0  # rows ever added
        self._size = 0
        # Saved so far (rows, frames per store) and the chunks holding what the buffer has now.
        self._saved_upto = 0
        self._frames_saved_upto: dict[tuple, int] = {}
        self._chunks: dict[str, tuple[tuple | None, int, int]] = {}  # name -> (store or None, first, end)
        self._reward_range = (np.inf, -np.inf)
        self._reward_abs_sum, self._rewards_seen = 0.0, 0

    def __len__(self) -> int:
        return self._size

    @property
    def added(self) -> int:
        """Rows ever added; row r lives in slot r % capacity."""
        return self._added

    @property
    def columns(self) -> dict[str, Any] | None:
        """The per-row arrays (stacked camera leaves as frame numbers); None before the first add."""
        return self._columns

    @property
    def frame_stores(self) -> dict[tuple, FrameStore]:
        """Per stacked camera leaf (its path in the observation), the store of its frames."""
        return self._stores

    @property
    def reward_range(self) -> tuple[float, float]:
        """The lowest and highest reward ever added (also of transitions since overwritten)."""
        return self._reward_range

    @property
    def reward_abs_mean(self) -> float:
        """The mean |reward| per step over every transition ever added: the run's reward scale."""
        return self._reward_abs_sum / max(self._rewards_seen, 1)

    def stats(self) -> dict[str, Any]:
        """What the driver logs of a buffer that lives in a learner (rl/td3/learner_replay.py)."""
        return {"size": self._size, "added": self._added, "reward_range": self._reward_range, "reward_abs_sum": self._reward_abs_sum,
                "rewards_seen": self._rewards_seen, "bytes_per_transition": self.bytes_per_transition}

    @property
    def bytes_per_transition(self) -> int:
        """Memory one stored transition takes, its share of the frame stores included; 0 before
        the first add."""
        if self._columns is None:
            return 0
        rows = sum(column[0].nbytes for column in tree.flatten(self._columns)) + 8 * len(self._needs)
        frames = sum(store.frames.nbytes for store in self._stores.values())
        return rows + -(-frames // self.capacity)

    @property
    def bytes_per_sample(self) -> int:
        """Bytes of one sampled transition, as the learner gets it (camera stacks rebuilt)."""
        if self._columns is None:
            return 0
        numbers = sum(self._column(col, path)[0].nbytes for col in OBS_COLUMNS for path in self._stores)
        pixels = sum(2 * self._column(Columns.OBS, path).shape[1] * store.frames[0].nbytes
                     for path, store in self._stores.items())
        return sum(column[0].nbytes for column in tree.flatten(self._columns)) - numbers + pixels

    def add(self, obs: Any, actions: np.ndarray, rewards: np.ndarray, next_obs: Any, terminateds: np.ndarray) -> None:
        """Adds n transitions; every argument is batched along axis 0."""
        n = len(rewards)
        # One sequence obs 0, next 0, obs 1, next 1, ...: a next_obs that slides its obs by a
        # frame (and an obs that continues the previous next_obs) shares its frames.
        sequence = tree.map_structure(lambda o, x: np.stack([o, x], 1).reshape(2 * n, *o.shape[1:]), obs, next_obs)
        self._add_sequence(sequence, np.arange(0, 2 * n, 2), np.arange(1, 2 * n, 2), actions, rewards, terminateds)

    def add_episodes(self, episodes: Iterable[SingleAgentEpisode]) -> int:
        """Adds sampled RLlib episode chunks; returns how many env steps they hold."""
        return self.add_chunks(chunks_of(episodes))

    def add_chunks(self, chunks: Iterable[EpisodeChunk]) -> int:
        """Flattens episode chunks into transitions; returns how many env steps they hold.

        A chunk of length n holds n + 1 observations. Only its last step can be terminal; a
        truncated last step is stored as non-terminal so that its target bootstraps. A chunk that
        continues an episode starts with the observation that ended its previous chunk: its
        frames are those already stored.
        """
        steps = 0
        for chunk in chunks:
            n = len(chunk.rewards)
            terminateds = np.zeros(n, np.float32)
            terminateds[-1] = float(chunk.terminated)
            last = self._add_sequence(
                chunk.observations, np.arange(n), np.arange(1, n + 1), chunk.actions, chunk.rewards,
                terminateds, link=self._links.pop(chunk.id, None),
            )
            if not chunk.done and last:
                self._links[chunk.id] = last
            steps += n
        # Episodes that never came back (an env runner replaced): their frames are gone by now.
        self._links = {
            key: link for key, link in self._links.items()
            if all(numbers.min() >= self._stores[path].oldest for path, numbers in link.items())
        }
        return steps

    def _add_sequence(self, sequence, obs_rows, next_rows, actions, rewards, terminateds, link=None) -> dict:
        """Adds the transitions (sequence[obs_rows[i]], ..., sequence[next_rows[i]]); returns the
        frame numbers of the sequence's last observation, per stacked camera leaf."""
        n = len(rewards)
        if n == 0:
            return {}
        rewards = np.asarray(rewards, np.float32)
        low, high = self._reward_range
        self._reward_range = (min(low, float(rewards.min())), max(high, float(rewards.max())))
        self._reward_abs_sum += float(np.abs(rewards).sum())
        self._rewards_seen += n
        batch = {
            Columns.OBS: tree.map_structure(lambda x: x[obs_rows], sequence),
            Columns.ACTIONS: np.asarray(actions, np.float32),
            Columns.REWARDS: rewards,
            Columns.NEXT_OBS: tree.map_structure(lambda x: x[next_rows], sequence),
            Columns.TERMINATEDS: np.asarray(terminateds, np.float32),
        }
        if self._columns is None:
            self._allocate(batch, _stacked_camera_paths(sequence))

        keep = max(0, n - self.capacity)  # only the newest `capacity` transitions can stay
        last, oldest_needed = {}, {}
        for path, store in self._stores.items():
            numbers = store.number(_get(sequence, path), (link or {}).get(path))
            last[path] = numbers[-1]
            for col, rows in ((Columns.OBS, obs_rows), (Columns.NEXT_OBS, next_rows)):
                _set(batch, (col, *path), numbers[rows])
            # Non-decreasing along the sequence: a transition only needs frames of its own
            # stacks, which never go back before the previous transition's.
            oldest_needed[path] = np.minimum(numbers[obs_rows].min(1), numbers[next_rows].min(1))
            # Frames just written overwrote the oldest: rows that needed them leave, and so do
            # this sequence's first transitions if it alone wrote more frames than the store holds.
            self._drop_rows_needing_before(path, store.oldest)
            keep = max(keep, int(np.searchsorted(oldest_needed[path], store.oldest)))
        m = n - keep
        if m == 0:
            return last
        batch = tree.map_structure(lambda x: x[keep:], batch)
        slots = (self._added + np.arange(m)) % self.capacity
        tree.map_structure(lambda column, x: column.__setitem__(slots, x), self._columns, batch)
        for path, needs in self._needs.items():
            new = oldest_needed[path][keep:]
            self._lower_needs(path, int(new[0]))
            needs[slots] = new
        self._added += m
        self._size = min(self._size + m, self.capacity)
        return last

    def _live_slots(self) -> list[slice]:
        """The slots of the rows held, oldest first: one slice, or two where the ring wraps."""
        first = (self._added - self._size) % self.capacity
        end = first + self._size
        if end <= self.capacity:
            return [slice(first, end)]
        return [slice(first, self.capacity), slice(0, end - self.capacity)]

    def _drop_rows_needing_before(self, path: tuple, frame: int) -> None:
        """Lets go the oldest rows that need a frame older than `frame` (a prefix: `needs` is
        non-decreasing by row)."""
        self._size -= sum(int(np.searchsorted(self._needs[path][s], frame)) for s in self._live_slots())

    def _lower_needs(self, path: tuple, frame: int) -> None:
        """A new row needs `frame`: every row before it leaves no later than it does."""
        for s in self._live_slots():
            needs = self._needs[path][s]
            needs[np.searchsorted(needs, frame, side="right") :] = frame

    @classmethod
    def check_fits(cls, capacity: int, observation_space, action_space) -> int:
        """Before anything starts: raises the ValueError the first add would, for transitions of
        these spaces, if `capacity` of them cannot fit in memory; else returns the bytes they need."""
        obs = tree.map_structure(lambda x: np.asarray(x)[None], observation_space.sample())
        batch = {
            Columns.OBS: obs, Columns.NEXT_OBS: obs,
            Columns.ACTIONS: np.asarray(action_space.sample(), np.float32)[None],
            Columns.REWARDS: np.zeros(1, np.float32), Columns.TERMINATEDS: np.zeros(1, np.float32),
        }
        return cls(capacity)._plan(batch, _stacked_camera_paths(obs))[3]

    def _plan(self, batch: dict[str, Any], camera_paths: list[tuple]) -> tuple[dict, dict, int, int]:
        """The ring's layout for transitions shaped like `batch` (its stacked camera leaves
        `camera_paths` as frame numbers), the frame stores' shapes, their size in frames and the
        bytes of it all; refused, with the numbers, if it would not fit in memory.

        numpy reserves the memory lazily, so an oversized buffer would not fail at allocation but
        kill the run hours later, when the ring fills up: refuse it now."""
        frames = self.capacity + max(FRAME_HEADROOM_MIN, int(self.capacity * FRAME_HEADROOM_FRACTION))
        layout = {key: tree.map_structure(lambda x: x[:1], value) for key, value in batch.items()}
        stores = {}
        for path in camera_paths:
            stacks = _get(batch[Columns.OBS], path)
            stores[path] = (stacks.shape[2:], stacks.dtype)
            for col in OBS_COLUMNS:
                _set(layout, (col, *path), np.zeros((1, stacks.shape[1]), np.int64))
        needed = self.capacity * (sum(x[0].nbytes for x in tree.flatten(layout)) + 8 * len(stores))
        needed += sum(frames * int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in stores.values())
        limit = memory_limit_bytes()
        if needed > MAX_MEMORY_FRACTION * limit:
            per_transition = needed / self.capacity
            raise ValueError(
                f"algo.buffer_size={self.capacity:,} transitions of {per_transition:,.0f} bytes need "
                f"{needed / 2**30:.1f} GiB, but this machine (or container) has "
                f"{limit / 2**30:.1f} GiB; at most about {int(MAX_MEMORY_FRACTION * limit // per_transition):,} "
                f"fit in {MAX_MEMORY_FRACTION:.0%} of it"
            )
        return layout, stores, frames, needed

    def _allocate(self, batch: dict[str, Any], camera_paths: list[tuple]) -> None:
        """Allocates the ring for transitions shaped like `batch`, after checking it fits."""
        layout, stores, frames, _ = self._plan(batch, camera_paths)
        self._columns = tree.map_structure(lambda x: np.empty((self.capacity, *x.shape[1:]), x.dtype), layout)
        self._stores = {path: FrameStore(frames, shape, dtype) for path, (shape, dtype) in stores.items()}
        self._needs = {path: np.zeros(self.capacity, np.int64) for path in stores}
        self._frames_saved_upto = {path: 0 for path in stores}

    def _column(self, col: str, path: tuple) -> np.ndarray:
        return _get(self._columns[col], path)

    def sample(self, num_items: int) -> dict[str, Any]:
        """`num_items` transitions drawn uniformly, with replacement, as a dict of columns."""
        if self._size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        offsets = self._rng.integers(0, self._size, size=num_items)
        return self._gather((self._added - self._size + offsets) % self.capacity)

    def _gather(self, slots: np.ndarray) -> dict[str, Any]:
        """The transitions in these slots, camera stacks rebuilt from their frames."""
        batch = tree.map_structure(lambda column: column[slots], self._columns)
        for path, store in self._stores.items():
            # obs and next_obs in one gather: one allocation, not two (3x faster measured: a
            # second large allocation alive at once costs its page faults anew)
            stacks = store.get(np.stack([_get(batch[col], path) for col in OBS_COLUMNS]))
            for col, stack in zip(OBS_COLUMNS, stacks):
                _set(batch, (col, *path), stack)
        return batch

    def save(self, directory: Path) -> dict[str, Any]:
        """Writes the rows and frames added since the last save into `directory` and returns the
        manifest a checkpoint keeps: the counters, the sampling RNG, and the chunks that hold
        what the buffer has now (older chunks are shared, not rewritten). Streams from the ring
        (np.save of views): writing needs no second copy of the buffer in memory."""
        directory = Path(directory)
        first = self._added - self._size  # the oldest row still in the buffer
        for start, end, slot in _runs(max(self._saved_upto, first), self._added, self.capacity):
            name = f"rows_{start:013d}_{end:013d}"
            _write_chunk(directory, name, {leaf: column[slot : slot + end - start] for leaf, column in self._leaves().items()})
            self._chunks[name] = (None, start, end)
        self._saved_upto = self._added
        for i, (path, store) in enumerate(self._stores.items()):
            for start, end, slot in _runs(max(self._frames_saved_upto[path], store.oldest), store.written, store.capacity):
                name = f"frames{i}_{start:013d}_{end:013d}"
                _write_chunk(directory, name, {"frames": store.frames[slot : slot + end - start]})
                self._chunks[name] = (path, start, end)
            self._frames_saved_upto[path] = store.written
        self._chunks = {
            name: (path, start, end) for name, (path, start, end) in self._chunks.items()
            if end > (first if path is None else self._stores[path].oldest)
        }
        return {
            "capacity": self.capacity,
            "added": self._added,
            "size": self._size,
            "frame_stores": [{"path": list(path), "written": store.written} for path, store in self._stores.items()],
            "chunks": list(self._chunks),
            "reward_range": list(self._reward_range),
            "reward_abs": [self._reward_abs_sum, self._rewards_seen],
            "rng": self._rng.bit_generator.state,
        }

    def load(self, directory: Path, manifest: dict[str, Any]) -> None:
        """Restores the buffer a `save` described, reading its chunks from `directory`; all or
        nothing: a load that fails leaves the buffer empty, never half-filled."""
        try:
            self._load(Path(directory), manifest)
        except BaseException:
            self._empty()
            raise

    def _load(self, directory: Path, manifest: dict[str, Any]) -> None:
        if manifest["capacity"] != self.capacity:
            raise ValueError(
                f"the checkpoint's replay buffer holds {manifest['capacity']:,} transitions, this "
                f"run's algo.buffer_size is {self.capacity:,}: resume with the run's own config"
            )
        self._empty()
        self._added, self._size = manifest["added"], manifest["size"]
        paths = [tuple(store["path"]) for store in manifest["frame_stores"]]
        chunks = {name: _read_chunk(directory / name) for name in manifest["chunks"]}
        for name, leaves in chunks.items():
            if name.startswith("rows_") and self._columns is None:
                self._allocate_from_rows(leaves, paths, chunks)
        for store, path in zip(manifest["frame_stores"], paths):
            self._stores[path].written = self._frames_saved_upto[path] = store["written"]
        first = self._added - self._size
        for name, leaves in chunks.items():
            kind, start, end = name.split("_")
            path = None if kind == "rows" else paths[int(kind[len("frames"):])]
            start, end = int(start), int(end)
            if path is None:
                skip = max(0, first - start)  # rows of the chunk overwritten since it was saved
                slot = (start + skip) % self.capacity
                for leaf, column in self._leaves().items():
                    column[slot : slot + end - start - skip] = leaves[leaf][skip:]
            else:
                self._stores[path].load(start, leaves["frames"])
            self._chunks[name] = (path, start, end)
        live = (first + np.arange(self._size)) % self.capacity
        for path, needs in self._needs.items():  # each row's oldest frame, then its suffix minimum
            oldest = np.minimum(self._column(Columns.OBS, path)[live].min(1), self._column(Columns.NEXT_OBS, path)[live].min(1))
            needs[live] = np.minimum.accumulate(oldest[::-1])[::-1]
        self._saved_upto = self._added
        self._reward_range = tuple(manifest["reward_range"])
        self._reward_abs_sum, self._rewards_seen = manifest["reward_abs"]
        self._rng.bit_generator.state = manifest["rng"]

    def _allocate_from_rows(self, leaves: dict[str, np.ndarray], paths: list[tuple], chunks: dict) -> None:
        """The ring for a checkpoint's rows: their layout, with camera leaves as frame numbers."""
        example = _unflatten({leaf: rows[:1] for leaf, rows in leaves.items()})
        for i, path in enumerate(paths):
            frames = next(c["frames"] for name, c in chunks.items() if name.startswith(f"frames{i}_"))
            stack = np.zeros((1, _get(example[Columns.OBS], path).shape[1], *frames.shape[1:]), frames.dtype)
            for col in OBS_COLUMNS:
                _set(example, (col, *path), stack)
        self._allocate(example, paths)

    def _leaves(self) -> dict[str, np.ndarray]:
        """The ring's per-row arrays by their path in the columns ("obs/image", "actions", ...)."""
        if self._columns is None:
            return {}
        return {"/".join(map(str, path)): column for path, column in tree.flatten_with_path(self._columns)}


OBS_COLUMNS = (Columns.OBS, Columns.NEXT_OBS)


def _stacked_camera_paths(observations: Any) -> list[tuple]:
    """Paths of the observation leaves that are stacked camera frames: uint8 (k, H, W) each."""
    return [tuple(path) for path, leaf in tree.flatten_with_path(observations) if is_camera_stack_sequence(leaf)]


def _get(nested: Any, path: tuple) -> Any:
    for key in path:
        nested = nested[key]
    return nested


def _set(nested: dict, path: tuple, value: Any) -> None:
    *parents, last = path
    _get(nested, tuple(parents))[last] = value


def _runs(start: int, end: int, capacity: int):
    """(first, end, slot) of each run of numbers start..end-1 contiguous in a ring of `capacity`."""
    while start < end:
        slot = start % capacity
        stop = min(end, start + capacity - slot)
        yield start, stop, slot
        start = stop


def _read_chunk(path: Path) -> dict[str, np.ndarray]:
    """A chunk's arrays; a missing or damaged one (cut short, overwritten) is an error that names it."""
    try:
        return {leaf: np.load(path / f"{leaf}.npy", mmap_mode="r") for leaf in json.loads((path / CHUNK_LEAVES).read_text())}
    except (OSError, ValueError) as error:
        raise ValueError(f"replay chunk {path} is missing or damaged ({type(error).__name__}: {error})") from None


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
