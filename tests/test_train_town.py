"""End to end on the shipped town config (configs/driving_town_td3.yaml), as shipped but for a
short run at the CI size: TD3 trains on carla_env:EmbeddedTown-v0, and the leaderboard's route
metrics reach metrics.jsonl and W&B for training and for evaluation episodes, with a video."""

import json
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.health_zoo import DRIVING_CI_SIZE
from carla_env.driving_score import INFRACTIONS
from rl.config import load_config
from rl.train import train
from tests.wandb_records import read_run

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "driving_town_td3.yaml"
ROUTE_METRICS = ("driving_score", "route_completion", *(f"infractions/{k}" for k in INFRACTIONS))


@pytest.mark.slow
def test_the_town_config_trains_and_reports_driving_scores_for_training_and_evaluation(ray_local, tmp_path, monkeypatch):
    for name in [k for k in __import__("os").environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    exp = load_config(CONFIG, [
        *DRIVING_CI_SIZE, "experiment.stop_env_steps=768", "algo.learning_starts=256",
        "evaluation.interval_iters=6", "evaluation.episodes=2", "evaluation.video=true",
        "wandb.enabled=true", "wandb.mode=offline", f"experiment.output_dir={tmp_path}",
    ])
    assert exp.env.id == "carla_env:EmbeddedTown-v0"
    summary = train(exp, run_dir=tmp_path / "run", show_progress=False)
    assert summary["status"] == "completed", summary

    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    for prefix in ("env/", "eval/"):
        assert all(prefix + name in last for name in ROUTE_METRICS), sorted(last)
        assert 0.0 <= last[prefix + "driving_score"] <= last[prefix + "route_completion"] <= 1.0, last
    # Every episode ends one way, route_complete included.
    ends = [v for k, v in last.items() if k.startswith("env/episode_end/")]
    assert sum(ends) == pytest.approx(1.0) and "env/episode_end/route_complete" in last

    history, _ = read_run(tmp_path / "run")
    logged = set().union(*history)
    assert {"env/driving_score", "eval/driving_score", "eval/infractions/collision_vehicle"} <= logged

    videos = sorted((tmp_path / "run" / "videos").glob("*.gif"))
    assert [v.name for v in videos] == ["final.gif", "iter_000006.gif", "iter_000012.gif"]
    assert all(Image.open(v).n_frames >= 2 for v in videos)
