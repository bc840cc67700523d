"""The replay lives with the learners: new transitions cross to them once, updates replay there.

With the replay in the driver, every update shipped its whole minibatch to the learner: 14.5 MB
at 84x84x4 and batch 256, ~1,000x what the replay keeps per transition, so a learner on another
node was bound by the network (Ape-X and R2D2 put replay shards beside the learners for this).
Here each learner holds a shard of the replay (`LearnerReplay`, mixed into TD3's learner); the
driver (`ReplayShards`) sends each new episode chunk to one shard, delta-coded
(rl/td3/transition_wire.py), and asks every learner for the updates owed: a few bytes. The
driver keeps the counters and the replay ratio; the learners draw their minibatches themselves.

Several learners: each samples its own share of the batch (`train_batch_size_per_learner`) from
its own shard and the gradients are averaged (rl/td3/td3_learner.py), as with one replay
sharded by the driver before. Chunks go to the shard with the fewest steps so far; a chunk
continuing an episode on another shard only stores its first stack's frames again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from ray.rllib.core import DEFAULT_MODULE_ID

from rl.checkpoints import shard_manifests
from rl.td3.device_replay import DeviceReplay, check_fits
from rl.td3.replay_buffer import TransitionReplayBuffer
from rl.td3.transition_wire import EpisodeChunk, chunks_of, pack, unpack, wire_bytes


class LearnerReplay:
    """A learner's shard of the replay, and updates replayed from it (mixed into the learner)."""

    def build_replay(self) -> None:
        config = self.config
        shards = max(config.num_learners, 1)
        rank = torch.distributed.get_rank() if shards > 1 and torch.distributed.is_initialized() else 0
        seed = None if config.seed is None else config.seed + rank
        self.replay = TransitionReplayBuffer(-(-config.replay_buffer_capacity // shards), seed=seed)
        # On a GPU, minibatches are drawn there, from a copy of the shard (rl/td3/device_replay.py).
        self.device_replay = None
        if self._device.type == "cuda" and config.learner_replay_on_gpu:
            module = self.module[DEFAULT_MODULE_ID]
            needed = TransitionReplayBuffer.check_fits(self.replay.capacity, module.observation_space, module.action_space)
            check_fits(needed, self.replay.capacity, self._device)
            self.device_replay = DeviceReplay(self.replay, self._device, seed)

    def add_to_replay(self, chunks: list[EpisodeChunk]) -> dict[str, Any]:
        self.replay.add_chunks(unpack(chunk) for chunk in chunks)
        if self.device_replay is not None:
            self.device_replay.sync()
        return self.replay.stats()

    def replay_and_update(self, num_updates: int, timesteps: dict) -> tuple[list[dict], float]:
        """`num_updates` minibatch updates of `train_batch_size_per_learner` transitions, each
        drawn from this shard; in calls of at most `learner_batch_max_mb` of batch (the
        metrics' overhead is per call, not per update), through the learner's update loop
        (rl/td3/captured_update.py). Returns RLlib's results of each call and the seconds spent
        sampling."""
        config = self.config
        rows = config.train_batch_size_per_learner
        per_call = max(1, int(config.learner_batch_max_mb * 2**20 // (rows * self.replay.bytes_per_sample)))
        results, sample_s = [], 0.0
        while num_updates > 0:
            n = min(num_updates, per_call)
            num_updates -= n
            start = time.perf_counter()
            columns = (self.device_replay or self.replay).sample(n * rows)
            sample_s += time.perf_counter() - start
            results.append(self.update_loop.update(columns, rows, timesteps))
        return results, sample_s

    def save_replay(self, directory: str) -> dict[str, Any]:
        return self.replay.save(Path(directory))

    def load_replay(self, directory: str, manifest: dict[str, Any]) -> dict[str, Any]:
        self.replay.load(Path(directory), manifest)
        if self.device_replay is not None:
            self.device_replay.sync(everything=True)
        return self.replay.stats()


def _call(learner, method: str, **kwargs):
    return getattr(learner, method)(**kwargs)


class ReplayShards:
    """The driver's side: routes new transitions to the learners' shards, asks them for updates,
    saves and loads them with checkpoints, and keeps what they report. `bytes_sent`: what it has
    handed the learners so far, serialized (what crosses to learners in other processes)."""

    def __init__(self, learner_group, timeout_s: float):
        self._group, self._timeout_s = learner_group, timeout_s
        self.num_shards = max(len(learner_group), 1)
        self._stats: list[dict[str, Any]] = [TransitionReplayBuffer.EMPTY_STATS] * self.num_shards
        self._steps_routed = [0] * self.num_shards
        self.bytes_sent = 0

    def _on_each(self, method: str, kwargs: list[dict]) -> list:
        """`method` of each learner (shard i gets kwargs[i]); results in shard order."""
        self.bytes_sent += sum(wire_bytes(kw) for kw in kwargs)
        if self._group.is_local:
            return [_call(self._group._learner, method, **kwargs[0])]
        manager = self._group._worker_manager
        order = manager.actor_ids()
        # Every learner, also one RLlib marked unhealthy after an error (a damaged shard on
        # resume): the caller decides what an error means, and the next call reaches it again.
        results = manager.foreach_actor(
            [_call] * len(order), kwargs=[{"method": method, **kw} for kw in kwargs], remote_actor_ids=order,
            healthy_only=False, mark_healthy=True, timeout_seconds=self._timeout_s,
        )
        by_actor = {}
        for result in results:
            if not result.ok:
                raise result.get()
            by_actor[result.actor_id] = result.get()
        missing = [i for i, actor_id in enumerate(order) if actor_id not in by_actor]
        if missing:
            raise RuntimeError(
                f"learner(s) {missing} did not answer {method} within resources.learner_timeout_s "
                f"({self._timeout_s:g} s): hung or lost; see their errors in the Ray logs"
            )
        return [by_actor[actor_id] for actor_id in order]

    def add(self, episodes: list) -> int:
        """Sends the episodes' transitions to the shards; returns the env steps they hold."""
        shards: list[list[EpisodeChunk]] = [[] for _ in range(self.num_shards)]
        steps = 0
        for chunk in chunks_of(episodes):
            shard = min(range(self.num_shards), key=self._steps_routed.__getitem__)
            shards[shard].append(pack(chunk))
            self._steps_routed[shard] += len(chunk.rewards)
            steps += len(chunk.rewards)
        if steps:
            self._stats = self._on_each("add_to_replay", [{"chunks": chunks} for chunks in shards])
        return steps

    def update(self, num_updates: int, timesteps: dict) -> tuple[list[dict], float]:
        """Every learner makes `num_updates` updates from its shard (in step: their gradients
        are averaged). Returns every learner call's results and the longest sampling time."""
        answers = self._on_each(
            "replay_and_update", [{"num_updates": num_updates, "timesteps": timesteps}] * self.num_shards
        )
        return [r for results, _ in answers for r in results], max(s for _, s in answers)

    def save(self, directory: Path) -> dict[str, Any]:
        """Each shard's new chunks into directory/shard<i>; the manifest a checkpoint keeps.
        The learners write (and later read) there themselves: with a learner on another node,
        the run directory must be on storage both nodes mount (k8s/storage.yaml)."""
        manifests = self._on_each(
            "save_replay", [{"directory": str(shard_dir(directory, i))} for i in range(self.num_shards)]
        )
        return {"shards": manifests}

    def load(self, directory: Path, manifest: dict[str, Any]) -> None:
        shards = shard_manifests(manifest)
        if len(shards) != self.num_shards:
            raise ValueError(
                f"the checkpoint's replay is in {len(shards)} learner shard(s), this run has "
                f"{self.num_shards} learner(s) (resources.num_learners): resume with the run's own config"
            )
        self._stats = self._on_each(
            "load_replay",
            [{"directory": str(shard_dir(directory, i)), "manifest": m} for i, m in enumerate(shards)],
        )
        self._steps_routed = [stats["size"] for stats in self._stats]

    @property
    def ready(self) -> bool:
        """Every shard holds a transition: every learner can sample."""
        return all(stats["size"] for stats in self._stats)

    def __len__(self) -> int:
        return sum(stats["size"] for stats in self._stats)

    @property
    def added(self) -> int:
        """Transitions the learners' shards ever took in: grows with the env steps sent, unless
        they stop reaching the replay (the `replay_not_filling` health rule)."""
        return sum(stats["added"] for stats in self._stats)

    @property
    def reward_range(self) -> tuple[float, float]:
        return (min(s["reward_range"][0] for s in self._stats), max(s["reward_range"][1] for s in self._stats))

    @property
    def reward_abs_mean(self) -> float:
        return sum(s["reward_abs_sum"] for s in self._stats) / max(sum(s["rewards_seen"] for s in self._stats), 1)

    @property
    def bytes_per_transition(self) -> int:
        return max(s["bytes_per_transition"] for s in self._stats)


def shard_dir(directory: Path, shard: int) -> Path:
    """Where a shard's chunks live: absolute, for a learner whose working directory (or node)
    is not the driver's."""
    return Path(directory).resolve() / f"shard{shard}"
