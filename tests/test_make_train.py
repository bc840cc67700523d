"""`make train`, the README's first command, as shipped: its Makefile target and its config (the
embedded town), cut to a few iterations with the target's own TRAIN_ARGS. Setup is not redone
here (`-o .venv/.installed`): `make test` has just done it."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers import run_in_own_group

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_train_runs_the_town_config_end_to_end(tmp_path):
    args = " ".join([
        "--no-progress", "--set experiment.stop_env_steps=192", "--set algo.learning_starts=128",
        "--set evaluation.episodes=1", "--set wandb.enabled=false", f"--set experiment.output_dir={tmp_path}",
    ])
    code, out, err = run_in_own_group(
        ["make", "-s", "-o", ".venv/.installed", "train", f"PY={sys.executable}", f"TRAIN_ARGS={args}"],
        timeout=600, cwd=ROOT,
    )
    assert code == 0, err[-3000:]
    assert "Training driving_town_td3: TD3 on carla_env:EmbeddedTown-v0, 192 env steps" in out
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["env_steps"] >= 192 and summary["learner_updates"] > 0, summary
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "losses/critic" in metrics[-1]
    assert (run_dir / "videos" / "final.gif").stat().st_size > 0
