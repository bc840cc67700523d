"""Frames stored once, stacks rebuilt at sample time: every transition the replay buffer holds
must be exactly what the env returned, across everything that cuts a frame sequence.

`NumberedFrames` paints into each frame which env, episode and step it is, so a stack says by
itself whether it is right: real RLlib env runners (two, with two envs each) sample episodes
that end by termination or truncation at random lengths, continue across sampling calls, and
interleave in the buffer; a small buffer wraps many times over."""

import gymnasium as gym
import numpy as np
import pytest
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

from rl.td3 import TD3Config
from rl.td3.replay_buffer import TransitionReplayBuffer

K, SIZE = 4, 6  # frames per stack, frame height and width
MAX_STEPS = 9  # episodes not terminated before are truncated


class NumberedFrames(gym.Env):
    """Frame t of episode e of env u: pixel (0, 0) = u, (0, 1) = e, (0, 2) = t + 1, the rest a
    pattern of the three. Stacks are oldest frame first; before t = 0 the env pads with copies of
    the first frame ("repeat", as carla_env does) or with black frames ("zeros"). The state vector
    says (u, e, t). Episodes terminate at a random step, or are truncated at MAX_STEPS."""

    def __init__(self, config):
        self.padding = config["padding"]
        self.uid = 10 * config.worker_index + config.vector_index + 1
        self.observation_space = gym.spaces.Dict({
            "image": gym.spaces.Box(0, 255, (K, SIZE, SIZE), np.uint8),
            "state": gym.spaces.Box(0, 1000, (3,), np.float32),
        })
        self.action_space = gym.spaces.Box(-1, 1, (1,), np.float32)
        self.episode = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode += 1
        self.t = 0
        self.terminate_at = int(self.np_random.integers(1, 2 * MAX_STEPS))  # half are truncated
        first = frame(self.uid, self.episode, 0)
        self.frames = [first if self.padding == "repeat" else np.zeros_like(first)] * (K - 1) + [first]
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        self.frames = self.frames[1:] + [frame(self.uid, self.episode, self.t)]
        terminated = self.t == self.terminate_at
        return self._obs(), 1.0, terminated, not terminated and self.t == MAX_STEPS, {}

    def _obs(self):
        return {"image": np.stack(self.frames), "state": np.array([self.uid, self.episode, self.t], np.float32)}


def frame(uid: int, episode: int, t: int) -> np.ndarray:
    image = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * (uid + 3 * episode + 7 * t) % 251).astype(np.uint8)
    image[0, :3] = uid, episode % 256, t + 1
    return image


def expected_stack(uid: int, episode: int, t: int, padding: str) -> np.ndarray:
    pad = frame(uid, episode, 0) if padding == "repeat" else np.zeros((SIZE, SIZE), np.uint8)
    return np.stack([frame(uid, episode, s) if s >= 0 else pad for s in range(t - K + 1, t + 1)])


def runners(padding: str, fragment: int) -> list[SingleAgentEnvRunner]:
    config = (
        TD3Config()
        .environment(NumberedFrames, env_config={"padding": padding})  # built with its runner and env index
        .env_runners(num_envs_per_env_runner=2, rollout_fragment_length=fragment)
        .rl_module(model_config={"actor_hidden": [8], "critic_hidden": [8],
                                 "cnn": {"channels": [4], "kernel_sizes": [3], "strides": [2], "feature_dim": 8}})
    )
    return [SingleAgentEnvRunner(config=config, worker_index=i) for i in (1, 2)]


def assert_every_transition_is_what_the_env_returned(buffer: TransitionReplayBuffer, padding: str) -> None:
    slots = (buffer._added - len(buffer) + np.arange(len(buffer))) % buffer.capacity
    batch = buffer._gather(slots)
    obs, next_obs = batch[Columns.OBS], batch[Columns.NEXT_OBS]
    for i in range(len(slots)):
        uid, episode, t = obs["state"][i].astype(int)
        assert tuple(next_obs["state"][i].astype(int)) == (uid, episode, t + 1)  # the real next step
        np.testing.assert_array_equal(obs["image"][i], expected_stack(uid, episode, t, padding), err_msg=f"obs {i}")
        np.testing.assert_array_equal(next_obs["image"][i], expected_stack(uid, episode, t + 1, padding), err_msg=f"next {i}")


@pytest.mark.parametrize("padding", ["repeat", "zeros"])
def test_every_stack_is_exact_across_episode_ends_runners_envs_iterations_and_ring_wraps(padding):
    # 2 runners x 2 envs x 5 steps per call: episodes of up to 9 steps span calls; 60 transitions
    # of room, 300 added: the ring wraps five times over.
    buffer = TransitionReplayBuffer(capacity=60, seed=0)
    env_runners = runners(padding, fragment=5)
    ends = {"terminated": 0, "truncated": 0}
    for _ in range(15):
        for runner in env_runners:
            episodes = runner.sample()
            for episode in episodes:
                if episode.is_terminated:
                    ends["terminated"] += 1
                elif episode.is_truncated:
                    ends["truncated"] += 1
            buffer.add_episodes(episodes)
            assert_every_transition_is_what_the_env_returned(buffer, padding)
    assert buffer._added >= 300 and len(buffer) == 60
    assert min(ends.values()) >= 5, ends  # both kinds of episode end happened, many times
    # Episode continuations shared their frames: about one new frame per step, not one stack.
    frames_written = buffer._stores[("image",)].written
    assert frames_written < buffer._added * 1.5, frames_written


def test_terminated_flags_match_the_episode_ends():
    buffer = TransitionReplayBuffer(capacity=500, seed=0)
    for runner in runners("repeat", fragment=5):
        for _ in range(10):
            buffer.add_episodes(runner.sample())
    slots = np.arange(len(buffer))
    batch = buffer._gather(slots)
    t_next = batch[Columns.NEXT_OBS]["state"][:, 2].astype(int)
    terminated = batch[Columns.TERMINATEDS].astype(bool)
    # A truncated last step (t + 1 == MAX_STEPS without terminating) is not terminal.
    assert not terminated[(t_next == MAX_STEPS) & ~terminated].any()
    assert terminated.any() and (~terminated & (t_next == MAX_STEPS)).any()


def test_frames_overwritten_before_their_transitions_take_those_transitions_out_first():
    """Stacks that share no frames (8 new frames per transition) outrun the frame store's
    headroom: the buffer holds fewer than `capacity` transitions, and never one whose frames are
    gone."""
    buffer = TransitionReplayBuffer(capacity=400, seed=0)  # frames: 400 + 256
    rng = np.random.default_rng(0)
    added = {"obs": [], "next": []}
    for _ in range(6):
        n = 50
        obs = {"image": rng.integers(0, 255, (n, K, SIZE, SIZE), np.uint8), "state": rng.normal(size=(n, 3)).astype(np.float32)}
        nxt = {"image": rng.integers(0, 255, (n, K, SIZE, SIZE), np.uint8), "state": rng.normal(size=(n, 3)).astype(np.float32)}
        buffer.add(obs, np.zeros((n, 1)), np.arange(n), nxt, np.zeros(n))
        added["obs"].append(obs["image"])
        added["next"].append(nxt["image"])
        batch = buffer._gather((buffer._added - len(buffer) + np.arange(len(buffer))) % buffer.capacity)
        np.testing.assert_array_equal(batch[Columns.OBS]["image"], np.concatenate(added["obs"])[-len(buffer):])
        np.testing.assert_array_equal(batch[Columns.NEXT_OBS]["image"], np.concatenate(added["next"])[-len(buffer):])
    # 8 frames per transition, 656 frames of room: the newest 82 transitions.
    assert len(buffer) == 656 // 8


def test_one_add_with_more_frames_than_the_store_holds_keeps_only_transitions_with_all_their_frames():
    buffer = TransitionReplayBuffer(capacity=300, seed=0)  # frames: 300 + 256
    rng = np.random.default_rng(1)
    n = 100  # 800 distinct frames in one call
    obs = {"image": rng.integers(0, 255, (n, K, SIZE, SIZE), np.uint8), "state": np.zeros((n, 3), np.float32)}
    nxt = {"image": rng.integers(0, 255, (n, K, SIZE, SIZE), np.uint8), "state": np.zeros((n, 3), np.float32)}
    buffer.add(obs, np.zeros((n, 1)), np.arange(n), nxt, np.zeros(n))
    assert len(buffer) == 556 // 8
    batch = buffer._gather(np.arange(len(buffer)))
    np.testing.assert_array_equal(batch[Columns.OBS]["image"], obs["image"][-len(buffer):])
    np.testing.assert_array_equal(batch[Columns.NEXT_OBS]["image"], nxt["image"][-len(buffer):])
    np.testing.assert_array_equal(batch[Columns.REWARDS], np.arange(n)[-len(buffer):])


def test_a_batch_of_consecutive_transitions_stores_each_frame_once():
    stacks = np.stack([expected_stack(1, 1, t, "repeat") for t in range(21)])
    states = np.arange(21, dtype=np.float32)[:, None].repeat(3, 1)
    buffer = TransitionReplayBuffer(capacity=100, seed=0)
    # obs t and next_obs t + 1, for t = 0..19: next_obs t is obs t + 1 again.
    buffer.add({"image": stacks[:20], "state": states[:20]}, np.zeros((20, 1)), np.ones(20),
               {"image": stacks[1:], "state": states[1:]}, np.zeros(20))
    assert buffer._stores[("image",)].written == 21  # the first frame (the padding is its copies), then 1 per step
    batch = buffer._gather(np.arange(20))
    np.testing.assert_array_equal(batch[Columns.OBS]["image"], stacks[:20])
    np.testing.assert_array_equal(batch[Columns.NEXT_OBS]["image"], stacks[1:])
