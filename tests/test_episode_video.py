"""Videos of the driving (rl/episode_video.py) and the checkpoint a run ends with, in the run
directory and in W&B (read back from the offline run file)."""

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from PIL import Image

import carla_env  # noqa: F401  (registers the driving envs)
from rl.config import load_config
from rl.episode_video import record_episode
from rl.evaluation import evaluate
from rl.train import train
from tests.wandb_records import read_run, records, run_files

ROOT = Path(__file__).resolve().parents[1]
SMALL_CAMERA = {"camera": {"width": 48, "height": 48, "frame_stack": 2}, "episode": {"max_seconds": 6.0}}


def keep_lane(obs) -> np.ndarray:
    return np.zeros(2, np.float32)


def test_a_video_is_the_episode_the_policy_drove_with_the_camera_beside_the_top_down_view(tmp_path):
    env = gym.make("carla_env:EmbeddedDriving-v0", render_mode="rgb_array", **SMALL_CAMERA)
    try:
        info = record_episode(env, keep_lane, tmp_path / "episode.gif", seed=7)
    finally:
        env.close()
    # The same episode as evaluation plays on the same seed: same length, same return.
    plain = evaluate("carla_env:EmbeddedDriving-v0", SMALL_CAMERA, keep_lane, seeds=[7])
    assert (info.steps, info.episode_return) == (plain.lengths[0], pytest.approx(plain.returns[0]))
    assert info.end == "time_limit" and info.bytes == (tmp_path / "episode.gif").stat().st_size

    gif = Image.open(tmp_path / "episode.gif")
    assert gif.n_frames == info.steps + 1  # the reset, then one frame per step
    assert gif.info["duration"] == 200  # real time: the env's 5 Hz control rate
    first = np.asarray(gif.convert("RGB"))
    # Top: highway-env's 600 x 150 top-down view: grey road, blue traffic, the yellow ego car.
    view = first[:150, :600].reshape(-1, 3).astype(int)
    for colour in ([100, 100, 100], [100, 200, 255], [200, 200, 0]):
        assert (np.abs(view - colour).sum(-1) < 30).any(), colour
    # Below: the two 48x48 camera frames, scaled to 150 x 150 each, grey: what the policy sees.
    camera = first[154:304]
    left = camera[:, (first.shape[1] - 304) // 2:][:, :150]
    assert np.allclose(left[..., 0], left[..., 1], atol=8) and left.std() > 10


def test_without_a_view_the_video_shows_the_camera_frames_only(tmp_path):
    from tests.image_reach_env import ImageReach

    info = record_episode(gym.wrappers.TimeLimit(ImageReach(), 5), lambda obs: np.zeros(2), tmp_path / "e.gif", seed=0)
    gif = Image.open(tmp_path / "e.gif")
    assert info.steps == 5 and gif.n_frames == 6 and gif.size[1] < 300


def test_a_view_lost_mid_episode_is_drawn_black_and_every_frame_keeps_its_size(tmp_path):
    """A CARLA server lost mid-episode takes its chase camera with it (the episode then ends)."""
    from tests.image_reach_env import ImageReach

    class LosesItsView(gym.Wrapper):
        render_mode = "rgb_array"
        steps = 0

        def step(self, action):
            self.steps += 1
            return self.env.step(action)

        def render(self):
            return np.full((40, 80, 3), 200, np.uint8) if self.steps < 2 else None

    record_episode(LosesItsView(gym.wrappers.TimeLimit(ImageReach(), 4)), lambda obs: np.zeros(2), tmp_path / "e.gif", seed=0)
    gif = Image.open(tmp_path / "e.gif")
    frames = []
    for i in range(gif.n_frames):
        gif.seek(i)
        frames.append(np.asarray(gif.convert("RGB")))
    left = (frames[0].shape[1] - 80) // 2
    views = [tuple(frame[5, left + 5]) for frame in frames]  # inside the 80 x 40 view, top centre
    assert views == [(200, 200, 200)] * 2 + [(0, 0, 0)] * 3, views
    # The camera frame below it (the target does not move in ImageReach) stays where it was.
    camera_rows = slice(44, 44 + 80)
    assert all(np.array_equal(frame[camera_rows], frames[0][camera_rows]) for frame in frames)


@pytest.mark.slow
@pytest.mark.parametrize("eval_runners", [0, 1])  # evaluation in the driver, or on a remote runner
def test_a_run_records_a_video_at_each_evaluation_and_at_the_end_and_sends_videos_and_its_checkpoint_to_wandb(
        ray_local, tmp_path, monkeypatch, eval_runners):
    for name in [k for k in __import__("os").environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    exp = load_config(ROOT / "configs" / "driving_embedded_td3.yaml", [
        f"env.kwargs.camera={json.dumps(SMALL_CAMERA['camera'])}",
        "env.kwargs.episode.max_seconds=4",
        "model.cnn={channels: [8], kernel_sizes: [8], strides: [4], feature_dim: 16}",
        "model.actor_hidden=[16]", "model.critic_hidden=[16]",
        "experiment.stop_env_steps=256", "algo.learning_starts=128", "algo.train_batch_size=32",
        "resources.rollout_fragment_length=64", "experiment.checkpoint_every_iters=2",
        "evaluation.interval_iters=2", "evaluation.episodes=1", "evaluation.video=true",
        f"evaluation.num_env_runners={eval_runners}",
        "wandb.enabled=true", "wandb.mode=offline", f"experiment.output_dir={tmp_path}",
    ])
    run_dir = tmp_path / "run"
    summary = train(exp, run_dir=run_dir, show_progress=False)
    assert summary["status"] == "completed", summary

    videos = sorted(p.name for p in (run_dir / "videos").iterdir())
    assert videos == ["final.gif", "iter_000002.gif", "iter_000004.gif"]
    # The reset and a frame per step: an untrained policy may crash before the 4 s (20 steps) are up.
    assert all(2 <= Image.open(run_dir / "videos" / v).n_frames <= 21 for v in videos)

    history, _ = read_run(run_dir)
    logged = [(row["_step"], key, row[f"{key}/path"]) for row in history
              for key in ("eval/video", "eval/video_final") if row.get(f"{key}/_type") == "video-file"]
    assert [(step, key) for step, key, _ in logged] == [(2, "eval/video"), (4, "eval/video"), (4, "eval/video_final")]
    (wandb_files,) = [p.parent / "files" for p in run_files(run_dir)]
    assert all(path.endswith(".gif") and (wandb_files / path).is_file() for *_, path in logged)

    artifacts = [r.artifact for r in records(run_files(run_dir)[0]) if r.WhichOneof("record_type") == "artifact"]
    (artifact,) = artifacts
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert (artifact.name, artifact.type) == (f"model-{run_id}", "model")
    assert {"final", "latest"} <= set(artifact.aliases)
    files = {entry.path for entry in artifact.manifest.contents}
    assert "rllib_checkpoint.json" in files and any(f.startswith("learner_group/") for f in files)
    assert not any("replay" in f for f in files)  # the replay buffer never goes to W&B
    assert json.loads(artifact.metadata)["env_steps"] == summary["env_steps"]
