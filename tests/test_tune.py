"""rl.tune: a small real search. One trial is unhealthy on purpose (a critic learning rate of
10): the health monitor stops it and it cannot be the best; the best config is written, loads
and trains."""

import json
from pathlib import Path

import pytest
import yaml

from rl.config import ConfigError, load_config
from rl.train import train
from rl.tune import load_search, search

ROOT = Path(__file__).resolve().parents[1]


def search_file(tmp_path, **changes) -> Path:
    spec = {
        "name": "lr_check",
        "base": str(ROOT / "configs" / "pendulum_td3.yaml"),
        "set": {
            "experiment.stop_env_steps": 1280,
            "algo.learning_starts": 320,
            "evaluation.interval_iters": 0,
            "evaluation.episodes": 1,
        },
        "search": {"algo.critic_lr": {"grid": [1.0e-3, 10.0]}},
        "metric": "episode/return_mean",
        "mode": "max",
        "output_dir": str(tmp_path / "tune"),
        "asha": {"max_iters": 100, "grace_iters": 100},
        **changes,
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_misspelled_searched_key_fails_at_load_not_in_a_trial(tmp_path):
    with pytest.raises(ConfigError, match="algo.critic_rl: unknown key"):
        load_search(search_file(tmp_path, search={"algo.critic_rl": {"grid": [1e-3]}}))
    with pytest.raises(ConfigError, match="give exactly one of choice, grid, uniform, loguniform, randint"):
        load_search(search_file(tmp_path, search={"algo.tau": {"normal": [0, 1]}}))


@pytest.mark.slow
def test_search_stops_the_unhealthy_trial_and_writes_a_best_config_that_trains(ray_local, tmp_path):
    best = search(load_search(search_file(tmp_path)))

    summaries = {}
    for summary_file in (tmp_path / "tune" / "lr_check").glob("*/run/summary.json"):
        summary = json.loads(summary_file.read_text())
        config = yaml.safe_load((summary_file.parent / "config.yaml").read_text())
        summaries[config["algo"]["critic_lr"]] = summary
    assert set(summaries) == {1e-3, 10.0}
    assert summaries[10.0]["status"] == "stopped_unhealthy" and summaries[10.0]["stopped_by"]
    assert summaries[1e-3]["status"] == "completed"
    # Each trial logs to W&B as its own run (offline here), named after the trial.
    assert len(list((tmp_path / "tune" / "lr_check").glob("*/run/wandb/offline-run-*"))) == 2

    exp = load_config(best, [f"experiment.output_dir={tmp_path / 'best'}", "experiment.stop_env_steps=640"])
    assert exp.algo.critic_lr == 1e-3
    assert "Best healthy trial of search 'lr_check' (1 healthy of 2)" in best.read_text()
    assert train(exp, show_progress=False)["status"] == "completed"
