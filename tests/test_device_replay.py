"""The replay's copy on the learner's device (rl/td3/device_replay.py) holds exactly what the
host buffer holds, through ring wrap-arounds and a checkpoint load, and samples only live rows.
Run on the CPU here (the same code, device "cpu"); on a GPU by the device check."""

import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns

from rl.td3 import device_replay
from rl.td3.device_replay import DeviceReplay
from rl.td3.replay_buffer import TransitionReplayBuffer
from rl.td3.td3_learner import CRITIC_LOSS, NUM_CRITIC_UPDATES
from tests.helpers import image_state_space, td3_learner, transition_columns

K, SIZE, CAPACITY = 4, 6, 50


def _add_episode(buffer: TransitionReplayBuffer, rng: np.random.Generator, length: int) -> None:
    """An episode of sliding 4-frame stacks (frames stored once); rewards number the rows."""
    frames = rng.integers(0, 256, (length + K, SIZE, SIZE), dtype=np.uint8)
    stacks = np.stack([frames[i : i + K] for i in range(length + 1)])
    states = rng.normal(size=(length + 1, 3)).astype(np.float32)
    rewards = buffer.added + np.arange(length, dtype=np.float32)
    buffer.add(
        {"image": stacks[:-1], "state": states[:-1]}, rng.uniform(-1, 1, (length, 2)).astype(np.float32),
        rewards, {"image": stacks[1:], "state": states[1:]}, np.zeros(length, np.float32),
    )


def _host_and_device_agree(buffer: TransitionReplayBuffer, mirror: DeviceReplay) -> None:
    live = (buffer.added - len(buffer) + np.arange(len(buffer))) % buffer.capacity
    host = buffer._gather(live)
    here = mirror.gather(torch.as_tensor(live))
    for col in (Columns.OBS, Columns.NEXT_OBS):
        for leaf in ("image", "state"):
            np.testing.assert_array_equal(here[col][leaf].numpy(), host[col][leaf], err_msg=f"{col}/{leaf}")
    for col in (Columns.ACTIONS, Columns.REWARDS, Columns.TERMINATEDS):
        np.testing.assert_array_equal(here[col].numpy(), host[col], err_msg=col)


def test_the_mirror_holds_what_the_buffer_holds_as_the_ring_wraps():
    rng = np.random.default_rng(0)
    buffer = TransitionReplayBuffer(CAPACITY, seed=0)
    mirror = DeviceReplay(buffer, torch.device("cpu"), seed=0)
    mirror.sync()  # nothing added yet: nothing to copy
    for length in [7, 30, 3, 61, 12, 45, 1, 80]:  # ~200 rows through a ring of 50: it wraps
        _add_episode(buffer, rng, length)
        mirror.sync()
        _host_and_device_agree(buffer, mirror)
    assert buffer.added > 3 * CAPACITY


def test_a_loaded_buffer_is_copied_whole(tmp_path):
    rng = np.random.default_rng(1)
    saved = TransitionReplayBuffer(CAPACITY, seed=0)
    for length in [40, 25, 33]:
        _add_episode(saved, rng, length)
    manifest = saved.save(tmp_path)
    loaded = TransitionReplayBuffer(CAPACITY, seed=0)
    mirror = DeviceReplay(loaded, torch.device("cpu"), seed=0)
    loaded.load(tmp_path, manifest)
    mirror.sync(everything=True)
    _host_and_device_agree(loaded, mirror)


def test_samples_come_from_live_rows_only_uniformly():
    rng = np.random.default_rng(2)
    buffer = TransitionReplayBuffer(CAPACITY, seed=0)
    mirror = DeviceReplay(buffer, torch.device("cpu"), seed=0)
    for length in [30, 40]:  # 70 rows added, the newest 50 live
        _add_episode(buffer, rng, length)
    mirror.sync()
    rewards = mirror.sample(20_000)[Columns.REWARDS].numpy()  # each row's number
    first = buffer.added - len(buffer)
    assert rewards.min() == first and rewards.max() == buffer.added - 1
    counts = np.bincount((rewards - first).astype(int), minlength=len(buffer))
    assert counts.min() > 0.7 * counts.mean()  # ~400 each: uniform, no row left out


def test_a_replay_the_gpu_cannot_hold_is_refused_naming_the_settings(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * 2**30, 80 * 2**30))
    with pytest.raises(ValueError, match=r"algo.buffer_size=1,000,000 .* 7.0 GiB .*2.0 GiB free.*learner_replay_on_gpu: false"):
        device_replay.check_fits(7 * 2**30, 1_000_000, torch.device("cuda"))
    device_replay.check_fits(1 * 2**30, 1_000_000, torch.device("cuda"))  # fits: no error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run by benchmarks/device_check.sh)")
@pytest.mark.parametrize("graphs", [True, False])
def test_a_gpu_learner_updates_from_its_replay_on_the_gpu(graphs):
    space = image_state_space()
    learner = td3_learner(space, gpus=1, learner_cuda_graphs=graphs, train_batch_size_per_learner=32,
                          replay_buffer_capacity=1000)
    assert learner.device_replay is not None and learner.update_loop.graphs == graphs
    c = transition_columns(space, 100)
    learner.replay.add(c[Columns.OBS], c[Columns.ACTIONS], c[Columns.REWARDS], c[Columns.NEXT_OBS], c[Columns.TERMINATEDS])
    learner.device_replay.sync()
    results, _ = learner.replay_and_update(40, timesteps={})
    stats = [r[DEFAULT_MODULE_ID] for r in results]
    assert sum(s[NUM_CRITIC_UPDATES].peek() for s in stats) == 40
    assert all(np.isfinite(s[CRITIC_LOSS].peek()) for s in stats)
