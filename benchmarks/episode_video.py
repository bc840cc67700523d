"""What an episode video costs (rl/episode_video.py): the same episodes played plain and recorded.

    python -m benchmarks.episode_video                 # the main config's env, seeds 0-4

The embedded env as `make train` runs it (84x84x4 camera, 40 s episodes at 5 Hz), the
keep-lane policy (the same episode either way), each seed played plain, then recorded: env
steps, rendering the top-down view, drawing the frames and writing the GIF. With
`evaluation.video` off nothing of this runs, so "off" costs nothing by construction.
Writes benchmarks/results/episode_video.json.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np

import carla_env  # noqa: F401  (registers the driving envs)
from rl.config import load_config
from rl.episode_video import record_episode

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "driving_embedded_td3.yaml"


def keep_lane(obs) -> np.ndarray:
    return np.zeros(2, np.float32)


def main() -> None:
    kwargs = load_config(CONFIG).env.kwargs
    env = gym.make("carla_env:EmbeddedDriving-v0", render_mode="rgb_array", **kwargs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(5):
            start = time.perf_counter()
            env.reset(seed=seed)
            steps, done = 0, False
            while not done:
                *_, terminated, truncated, _ = env.step(keep_lane(None))
                steps, done = steps + 1, terminated or truncated
            plain_s = time.perf_counter() - start
            info = record_episode(env, keep_lane, Path(tmp) / f"{seed}.gif", seed=seed)
            assert info.steps == steps
            rows.append({"seed": seed, "steps": steps, "plain_s": plain_s, "recorded_s": info.seconds,
                         "overhead_ms_per_step": (info.seconds - plain_s) / steps * 1000, "bytes": info.bytes})
            print(json.dumps(rows[-1]))
    env.close()
    total = {k: float(np.sum([r[k] for r in rows])) for k in ("steps", "plain_s", "recorded_s", "bytes")}
    summary = {
        "steps": total["steps"], "plain_s": total["plain_s"], "recorded_s": total["recorded_s"],
        "overhead_ms_per_step": (total["recorded_s"] - total["plain_s"]) / total["steps"] * 1000,
        "kb_per_step": total["bytes"] / total["steps"] / 1024,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "episode_video.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
