"""The replay path: episodes sampled by a real RLlib env runner become correct transitions."""

import gymnasium as gym
import numpy as np
import pytest
import tree
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

from rl.td3 import TD3Config
from rl.td3.replay_buffer import TransitionReplayBuffer


class StepCounterEnv(gym.Env):
    """Observation = steps taken in this episode. Terminates at `terminate_at` steps when set;
    a TimeLimit wrapper truncates otherwise. The final observation tells the two apart."""

    observation_space = gym.spaces.Box(0, 1000, (1,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

    def __init__(self, terminate_at: int | None = None):
        self.terminate_at = terminate_at

    def reset(self, *, seed=None, options=None):
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        terminated = self.terminate_at is not None and self.t >= self.terminate_at
        return np.array([self.t], np.float32), float(self.t), terminated, False, {}


gym.register("StepCounter-v0", entry_point=StepCounterEnv, max_episode_steps=5)


def _sample_into_buffer(env_config: dict, num_steps: int) -> dict:
    config = (
        TD3Config()
        .environment("StepCounter-v0", env_config=env_config)
        .env_runners(num_env_runners=0, rollout_fragment_length=num_steps)
        .training(num_steps_sampled_before_learning_starts=0)
        .rl_module(model_config={"actor_hidden": [8], "critic_hidden": [8]})
    )
    runner = SingleAgentEnvRunner(config=config)
    buffer = TransitionReplayBuffer(capacity=100)
    added = buffer.add_episodes(runner.sample(num_timesteps=num_steps))
    assert added == num_steps == len(buffer)
    return {k: v[:num_steps] for k, v in buffer._columns.items()}


def test_truncated_steps_are_not_terminal_and_keep_their_real_final_observation():
    columns = _sample_into_buffer({}, num_steps=12)  # episodes of 5, truncated by TimeLimit
    obs, next_obs = columns[Columns.OBS][:, 0], columns[Columns.NEXT_OBS][:, 0]
    np.testing.assert_array_equal(obs, [0, 1, 2, 3, 4] * 2 + [0, 1])
    # Step 5 ends the episode by truncation: its next observation is 5, not the reset's 0.
    np.testing.assert_array_equal(next_obs, [1, 2, 3, 4, 5] * 2 + [1, 2])
    assert not columns[Columns.TERMINATEDS].any()
    np.testing.assert_array_equal(columns[Columns.REWARDS], next_obs)


def test_terminal_steps_are_marked_terminal():
    columns = _sample_into_buffer({"terminate_at": 3}, num_steps=7)
    np.testing.assert_array_equal(columns[Columns.OBS][:, 0], [0, 1, 2, 0, 1, 2, 0])
    np.testing.assert_array_equal(columns[Columns.TERMINATEDS], [0, 0, 1, 0, 0, 1, 0])


def test_ring_keeps_the_newest_transitions():
    buffer = TransitionReplayBuffer(capacity=4, seed=0)
    for start in (0, 3):
        n = 3
        buffer.add(
            obs=np.arange(start, start + n, dtype=np.float32)[:, None],
            actions=np.zeros((n, 1)),
            rewards=np.arange(start, start + n),
            next_obs=np.arange(start + 1, start + n + 1, dtype=np.float32)[:, None],
            terminateds=np.zeros(n),
        )
    assert len(buffer) == 4
    assert sorted(buffer._columns[Columns.REWARDS].tolist()) == [2, 3, 4, 5]
    assert set(buffer.sample(200)[Columns.REWARDS].tolist()) == {2, 3, 4, 5}


def test_dict_observations_keep_their_dtypes():
    buffer = TransitionReplayBuffer(capacity=10, seed=0)
    obs = {"image": np.ones((2, 4, 8, 8), np.uint8), "state": np.zeros((2, 5), np.float32)}
    buffer.add(obs, np.zeros((2, 2)), np.zeros(2), obs, np.zeros(2))
    batch = buffer.sample(3)
    assert batch[Columns.OBS]["image"].dtype == np.uint8
    assert batch[Columns.NEXT_OBS]["image"].shape == (3, 4, 8, 8)
    assert batch[Columns.OBS]["state"].dtype == np.float32


def test_sampling_an_empty_buffer_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        TransitionReplayBuffer(capacity=10).sample(1)


def _image_transitions(n: int) -> dict:
    from tests.helpers import image_state_space, transition_columns

    columns = transition_columns(image_state_space(frames=4, size=84, state_dim=10), n)
    return {
        "obs": columns[Columns.OBS],
        "actions": columns[Columns.ACTIONS],
        "rewards": columns[Columns.REWARDS],
        "next_obs": columns[Columns.NEXT_OBS],
        "terminateds": columns[Columns.TERMINATEDS],
    }


def test_image_transitions_keep_uint8_and_come_back_as_they_went_in():
    buffer = TransitionReplayBuffer(capacity=10, seed=0)
    transitions = _image_transitions(3)
    buffer.add(**transitions)
    sample = buffer._gather(np.arange(3))
    for col, name in ((Columns.OBS, "obs"), (Columns.NEXT_OBS, "next_obs")):
        assert sample[col]["image"].dtype == np.uint8 and sample[col]["image"].shape == (3, 4, 84, 84)
        np.testing.assert_array_equal(sample[col]["image"], transitions[name]["image"])
        np.testing.assert_array_equal(sample[col]["state"], transitions[name]["state"])
    # What the learner gets per transition: 2 x (4*84*84 uint8 + 10 float32) + 2 actions + reward + terminated
    assert buffer.bytes_per_sample == 2 * (4 * 84 * 84 + 40) + 4 * (2 + 1 + 1)


def test_a_million_84x84x4_camera_transitions_take_under_7_5_gb(monkeypatch):
    monkeypatch.setattr("rl.td3.replay_buffer.memory_limit_bytes", lambda: 64 * 2**30)
    buffer = TransitionReplayBuffer(capacity=1_000_000, seed=0)  # numpy reserves it lazily
    buffer.add(**_image_transitions(2))
    # Each frame once (7,056 bytes, with 3% headroom for episode starts), 4 + 4 frame numbers
    # (int64), the row's oldest frame, state 2 x 10 float32, action, reward, terminated.
    frames = 7056 * (1_000_000 + 31_250) / 1_000_000
    assert buffer.bytes_per_transition == int(np.ceil(frames)) + 8 * 8 + 8 + 2 * 40 + 4 * (2 + 1 + 1)
    assert buffer.bytes_per_transition * 1_000_000 < 7.5e9  # stacks stored twice took 56.5 GB


def test_a_buffer_larger_than_memory_is_refused_before_it_fills_and_kills_the_run(monkeypatch):
    monkeypatch.setattr("rl.td3.replay_buffer.memory_limit_bytes", lambda: 2**30)  # 1 GiB
    buffer = TransitionReplayBuffer(capacity=200_000, seed=0)  # 200k x 7.4 KB = 1.4 GiB
    with pytest.raises(
        ValueError,
        match=r"algo.buffer_size=200,000 transitions of 7,444 bytes need 1.4 GiB, but this "
        r"machine \(or container\) has 1.0 GiB; at most about 115,386 fit in 80% of it",
    ):
        buffer.add(**_image_transitions(2))


def live_slots(buffer: TransitionReplayBuffer) -> np.ndarray:
    return (buffer._added - len(buffer) + np.arange(len(buffer))) % buffer.capacity


def assert_same_buffer(a: TransitionReplayBuffer, b: TransitionReplayBuffer) -> None:
    assert (len(a), a._added, a.reward_range, a.reward_abs_mean) == (len(b), b._added, b.reward_range, b.reward_abs_mean)
    x, y = a._gather(live_slots(a)), b._gather(live_slots(b))  # every transition held, bit for bit
    for (path, u), (_, v) in zip(tree.flatten_with_path(x), tree.flatten_with_path(y)):
        assert np.array_equal(u, v), path
    x, y = a.sample(6), b.sample(6)  # and the same sampling stream
    assert np.array_equal(x[Columns.OBS]["image"], y[Columns.OBS]["image"])


def test_save_and_load_keep_transitions_position_and_sampling_stream(tmp_path):
    buffer = TransitionReplayBuffer(capacity=10, seed=3)
    buffer.add(**_image_transitions(4))
    restored = TransitionReplayBuffer(capacity=10, seed=99)
    restored.load(tmp_path, buffer.save(tmp_path))
    assert_same_buffer(buffer, restored)
    buffer.add(**_image_transitions(1))
    restored.add(**_image_transitions(1))
    assert len(restored) == 5
    with pytest.raises(ValueError, match="holds 10 transitions, this run's algo.buffer_size is 20"):
        TransitionReplayBuffer(capacity=20).load(tmp_path, buffer.save(tmp_path))


def rows_chunks(manifest: dict) -> list[str]:
    return [name for name in manifest["chunks"] if name.startswith("rows_")]


def test_each_save_writes_only_the_rows_added_since_the_last_and_drops_chunks_overwritten_since(tmp_path):
    buffer = TransitionReplayBuffer(capacity=10, seed=0)
    buffer.add(**_image_transitions(4))  # random images: 8 distinct frames per transition
    manifest = buffer.save(tmp_path)
    assert manifest["chunks"] == ["rows_0000000000000_0000000000004", "frames0_0000000000000_0000000000032"]
    buffer.add(**_image_transitions(3))
    assert buffer.save(tmp_path)["chunks"][-2:] == ["rows_0000000000004_0000000000007", "frames0_0000000000032_0000000000056"]
    assert len(buffer.save(tmp_path)["chunks"]) == 4  # nothing new: no chunk
    buffer.add(**_image_transitions(6))  # rows 7..12: slots 7, 8, 9, then 0, 1, 2 (the ring wraps)
    manifest = buffer.save(tmp_path)
    # Rows 0-2 are overwritten: their chunk is partly needed (row 3); the new rows are two
    # chunks, one per contiguous run of slots.
    assert rows_chunks(manifest) == ["rows_0000000000000_0000000000004", "rows_0000000000004_0000000000007",
                                     "rows_0000000000007_0000000000010", "rows_0000000000010_0000000000013"]
    assert (tmp_path / "rows_0000000000010_0000000000013" / "obs" / "image.npy").stat().st_size < 500  # numbers
    restored = TransitionReplayBuffer(capacity=10, seed=1)
    restored.load(tmp_path, manifest)
    assert_same_buffer(buffer, restored)
    buffer.add(**_image_transitions(4))  # rows 13..16 overwrite 3..6: the first two chunks are not needed
    assert rows_chunks(buffer.save(tmp_path))[0] == "rows_0000000000007_0000000000010"
