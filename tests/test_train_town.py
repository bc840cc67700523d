"""End to end on the shipped town config (configs/driving_town_td3.yaml) at the CI size: TD3 with
the CNN learns to drive routes through junctions better than the constant action, judged as the
CARLA leaderboard judges a route (driving score over 20 routes, the deterministic policy), and
the route metrics reach metrics.jsonl and W&B for training and evaluation episodes, with videos.

The bar is the strongest simple baseline that needs no map knowledge beyond the state vector's
look-ahead, the constant action [0, 0] (driving score ~0.16: it leaves the route at its first turn);
the route-following controller (~0.81) and random actions (~0.05) are in benchmarks/README.md,
"The town", with this recipe's driving scores over 5 seeds (0.55-0.78).
"""

import json
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.driving_baselines import baselines
from benchmarks.health_zoo import DRIVING_CI_SIZE
from callbacks.alerts import read_alerts
from carla_env.driving_score import INFRACTIONS
from rl.config import load_config
from rl.evaluation import evaluate, trained_policy
from rl.train import train
from tests.wandb_records import read_run

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "driving_town_td3.yaml"
ROUTE_METRICS = ("driving_score", "route_completion", *(f"infractions/{k}" for k in INFRACTIONS))
ROUTES = range(1000, 1020)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # a learning run on a loaded machine (tests/test_train_driving.py)
def test_td3_with_cnn_drives_town_routes_better_than_the_constant_action_and_reports_driving_scores(
        ray_local, tmp_path, monkeypatch):
    for name in [k for k in __import__("os").environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    exp = load_config(CONFIG, [
        *DRIVING_CI_SIZE, "experiment.stop_env_steps=8000", "experiment.seed=0",
        "evaluation.interval_iters=60", "evaluation.episodes=2", "evaluation.video=true",
        "wandb.enabled=true", "wandb.mode=offline", f"experiment.output_dir={tmp_path}",
    ])
    assert exp.env.id == "carla_env:EmbeddedTown-v0"
    summary = train(exp, run_dir=tmp_path / "run", show_progress=False)
    assert summary["status"] == "completed", summary

    ours = evaluate(exp.env.id, exp.env.kwargs, trained_policy(summary["final_checkpoint"]), ROUTES)
    constant = evaluate(exp.env.id, exp.env.kwargs, baselines(exp.env.id, exp.env.kwargs)["constant [0, 0]"], ROUTES)
    table = {"ours": ours.row(), "constant": constant.row()}
    assert ours.driving_score_mean > constant.driving_score_mean + 0.1, table
    assert ours.route_completion_mean > constant.route_completion_mean, table

    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # Episode metrics are in the rows of iterations where an episode ended (a training episode,
    # an evaluation): the last of each.
    trained = [line for line in lines if "env/driving_score" in line][-1]
    evaluated = [line for line in lines if "eval/return_mean" in line][-1]
    for prefix, line in (("env/", trained), ("eval/", evaluated)):
        assert all(prefix + name in line for name in ROUTE_METRICS), sorted(line)
        assert 0.0 <= line[prefix + "driving_score"] <= line[prefix + "route_completion"] <= 1.0, line
    ends = [v for k, v in trained.items() if k.startswith("env/episode_end/")]
    assert sum(ends) == pytest.approx(1.0) and "env/episode_end/route_complete" in trained

    history, _ = read_run(tmp_path / "run")
    logged = set().union(*history)
    assert {"env/driving_score", "eval/driving_score", "eval/infractions/collision_vehicle"} <= logged

    videos = sorted(v.name for v in (tmp_path / "run" / "videos").glob("*.gif"))
    assert videos == ["final.gif", "iter_000060.gif", "iter_000120.gif"]
    assert all(Image.open(tmp_path / "run" / "videos" / v).n_frames >= 2 for v in videos)

    # A healthy run: no CRITICAL; a WARN only if it cleared (an INFO for its rule came after it).
    alerts = read_alerts(tmp_path / "run")
    assert not [a for a in alerts if a["level"] == "CRITICAL"], alerts
    for i, warn in enumerate(alerts):
        if warn["level"] == "WARN":
            assert any(a["level"] == "INFO" and a["rule"] == warn["rule"] for a in alerts[i + 1:]), alerts
