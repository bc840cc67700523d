"""The replay lives with the learners (rl/td3/learner_replay.py): each new transition crosses to
a learner once, delta-coded (rl/td3/transition_wire.py), and no minibatch crosses at all."""

import json

import numpy as np
import pytest

from benchmarks.health_zoo import DRIVING_CI_SIZE
from rl.config import load_config
from rl.td3.transition_wire import EpisodeChunk, pack, unpack, wire_bytes
from rl.train import train


def chunk_with(stacks: np.ndarray, state_dim: int = 3) -> EpisodeChunk:
    n = len(stacks) - 1
    rng = np.random.default_rng(1)
    observations = {"image": stacks, "state": rng.normal(size=(n + 1, state_dim)).astype(np.float32)}
    return EpisodeChunk("ep", observations, np.zeros((n, 2), np.float32), np.ones(n, np.float32), False, False)


def sliding_stacks(frames: np.ndarray, k: int) -> np.ndarray:
    return np.stack([frames[i : i + k] for i in range(len(frames) - k + 1)])


@pytest.mark.parametrize("layout", ["sliding", "padded start", "not sliding", "repeated"])
def test_packing_restores_every_stack_exactly_and_a_sliding_stack_costs_one_frame(layout):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (40, 12, 10), dtype=np.uint8)
    k = 4
    stacks = sliding_stacks(frames, k)  # 37 stacks, each the last slid by one frame
    if layout == "padded start":  # an episode's start: stacks padded with its first frame
        stacks = sliding_stacks(np.concatenate([frames[:1].repeat(k - 1, 0), frames[: 37]]), k)
    elif layout == "not sliding":  # newest frame first: no stack is the previous one slid
        stacks = stacks[:, ::-1].copy()
    elif layout == "repeated":
        stacks[5] = stacks[4]
    chunk = chunk_with(stacks)
    packed = pack(chunk)
    restored = unpack(packed)

    assert np.array_equal(restored.observations["image"], stacks)
    assert np.array_equal(restored.observations["state"], chunk.observations["state"])
    assert restored._replace(observations=None) == chunk._replace(observations=None)
    frame_bytes = frames[0].nbytes
    sent = packed.observations["image"].packed["frames"]
    if layout == "not sliding":
        assert len(sent) == len(stacks) * k
    elif layout == "padded start":
        assert len(sent) == 1 + len(stacks) - 1  # the padding once
    elif layout == "sliding":
        assert len(sent) == k + len(stacks) - 1  # the first stack whole, then one frame each
        assert wire_bytes(packed) < (len(stacks) + 2 * k) * frame_bytes + 2_000


@pytest.mark.slow
def test_the_learner_actor_gets_each_transition_once_and_no_minibatch(ray_local, tmp_path):
    """Driving at 84x84x4 with the learner in its own actor (resources.num_learners=1): what is
    sent to it over a run, per env step sampled, is at most 1.5x one stored transition. With the
    replay in the driver it was ~56.5 KB x batch x updates per env step (~7 MB here)."""
    model = [o for o in DRIVING_CI_SIZE if o.startswith("model.")]
    exp = load_config(
        "configs/driving_embedded_td3.yaml",
        [*model, "experiment.stop_env_steps=640", "algo.learning_starts=256", "algo.train_batch_size=32",
         "evaluation.interval_iters=0", "evaluation.episodes=1", "evaluation.video=false", "wandb.mode=offline",
         "resources.num_learners=1", f"experiment.output_dir={tmp_path}"],
    )
    assert exp.env.kwargs["camera"] == {"width": 84, "height": 84, "frame_stack": 4}
    summary = train(exp, run_dir=tmp_path / "run", show_progress=False)
    assert summary["status"] == "completed"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sent = sum(r["perf/learner_input_bytes"] for r in rows)
    per_transition = rows[-1]["replay/bytes_per_transition"]
    assert 7_000 < per_transition < 8_000  # one 84x84 frame, and the row's numbers and state
    assert rows[-1]["learner/num_critic_updates"] == 640 - 256  # the updates were asked for too
    assert sent / summary["env_steps"] <= 1.5 * per_transition, (sent / summary["env_steps"], per_transition)
    assert rows[-1]["replay/size"] == 640
