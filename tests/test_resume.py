"""Resume after a crash: a training process is killed (SIGKILL, no chance to clean up) and
`rl.train --resume` continues it from its newest checkpoint with the same model, optimizer
state, replay buffer and counters."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rl.config import load_config
from rl.experiment import build_td3_config
from rl.train import main, restore, train
from tests.wandb_records import read_run, run_files

ROOT = Path(__file__).resolve().parents[1]


# The same run on vector observations (Pendulum) and on camera images (ImageReach, uint8 frames).
OBSERVATIONS = {
    "vector": {},
    "image": {
        "env.id": "tests.image_reach_env:ImageReach-v0",
        "env.reward_bounds": "[-2.5456, 0.0]",
        "model.cnn": "{channels: [8], kernel_sizes: [4], strides: [2], feature_dim: 16}",
        "model.actor_hidden": "[32]",
        "model.critic_hidden": "[32]",
    },
}


def command_line(output_dir: Path, observations: str, stop_env_steps: int = 100_000) -> list[str]:
    """The arguments of the run (100k steps: it runs until killed)."""
    overrides = {
        **OBSERVATIONS[observations],
        "experiment.output_dir": str(output_dir),
        "experiment.stop_env_steps": stop_env_steps,
        "experiment.checkpoint_every_iters": 5,
        "algo.learning_starts": 320,
        "evaluation.interval_iters": 0,
        "wandb.mode": "offline",
    }
    sets = [arg for k, v in overrides.items() for arg in ("--set", f"{k}={v}")]
    return ["--config", str(ROOT / "configs" / "pendulum_td3.yaml"), "--no-progress", *sets]


def start_training(output_dir: Path, observations: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "rl.train", *command_line(output_dir, observations)]
    # Its own W&B service: WANDB_SERVICE, set by an earlier test's W&B run in this process, would
    # register the run in this process's service, which holds its id "in use" after the kill.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_after_checkpoint(process: subprocess.Popen, output_dir: Path, iteration: int, timeout_s: float = 240) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = list(output_dir.glob("pendulum_td3-*"))
        if runs and (runs[0] / "checkpoints" / f"iter_{iteration:06d}" / "algorithm_state.pkl").is_file():
            rows = (runs[0] / "metrics.jsonl").read_text().splitlines()
            if len(rows) > iteration:  # it went on past the checkpoint: those rows must not count
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return runs[0]
        assert process.poll() is None, "training exited before it was killed"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError("no checkpoint in time")


@pytest.mark.slow
@pytest.mark.parametrize("observations", OBSERVATIONS)
def test_a_killed_run_resumes_with_its_model_optimizer_buffer_and_counters(ray_local, tmp_path, monkeypatch, observations):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = kill_after_checkpoint(start_training(tmp_path, observations), tmp_path, iteration=10)
    exp = load_config(run_dir / "config.yaml", ["experiment.stop_env_steps=1600"])

    # Restored state equals the checkpoint's.
    algo = build_td3_config(exp).build_algo()
    try:
        row = restore(algo, run_dir).rows[-1]
        assert row["iteration"] == algo.training_iteration == 10
        assert len(algo.replay) == row["replay/size"] == 640
        learner = algo.learner_group._learner
        module_file = run_dir / "checkpoints" / "iter_000010" / "learner_group" / "learner" / "rl_module" / "default_policy" / "module_state.pkl"
        saved = pickle.loads(module_file.read_bytes())
        restored = learner.module["default_policy"].get_state()
        assert saved.keys() == restored.keys() and any(k.startswith("target_critic.") for k in saved)
        for name, value in saved.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(restored[name])), name
        adam = learner.get_optimizer("default_policy", "critic")
        assert adam.state and all(int(s["step"]) == row["learner/num_critic_updates"] for s in adam.state.values())
    finally:
        algo.stop()

    # Training goes on from there: counters continue, no iteration twice in metrics.jsonl.
    summary = train(exp, run_dir=run_dir, show_progress=False, resume=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    iterations = [r["iteration"] for r in rows]
    assert iterations == list(range(1, len(rows) + 1))
    after = rows[10]  # the first resumed iteration, 11
    assert after["env/steps_sampled"] == rows[9]["env/steps_sampled"] + 64
    assert after["replay/size"] == 640 + 64
    assert after["learner/num_critic_updates"] == rows[9]["learner/num_critic_updates"] + 64
    assert summary["env_steps"] >= 1600 and summary["status"] == "completed"
    assert list(run_dir.glob("metrics.after_000010.jsonl"))  # the rows of the killed process, kept aside

    # W&B: the resumed process continues the same run (one id). The killed process lost what
    # W&B had not flushed (offline: all of it), so the resumed one logs the restored rows first:
    # every iteration once, in order, with the values of metrics.jsonl.
    files = run_files(run_dir)  # the killed process's may be missing: W&B had not written it yet
    run_id = (run_dir / "wandb_run_id").read_text()
    assert {f.name for f in files} == {f"run-{run_id}.wandb"}
    history = read_run(run_dir, files[-1])[0]
    assert [h["_step"] for h in history] == iterations
    assert [h["env/steps_sampled"] for h in history] == [r["env/steps_sampled"] for r in rows]

    # A retried job (k8s/rayjob.yaml) passes the same arguments and --run-dir: on a started run of
    # the same experiment, that resumes it (with more steps to go: the config records them).
    assert main([*command_line(tmp_path, observations, stop_env_steps=1920), "--run-dir", str(run_dir)]) == 0
    assert load_config(run_dir / "config.yaml").experiment.stop_env_steps == 1920
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, len(rows) + 1))
    assert rows[-1]["env/steps_sampled"] >= 1920


def test_rows_set_aside_by_two_crashes_after_the_same_checkpoint_are_all_kept(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from rl import checkpoints

    monkeypatch.setattr(checkpoints, "restore_newest", lambda algo, store, **_: (store / "iter_000002", []))
    algo = SimpleNamespace(training_iteration=2)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"iteration": i, "try": 1}) + "\n" for i in (1, 2, 3, 4)))
    assert [r["iteration"] for r in restore(algo, tmp_path).rows] == [1, 2]
    with open(metrics, "a") as f:  # the resumed process crashes too, before its next checkpoint
        f.write("".join(json.dumps({"iteration": i, "try": 2}) + "\n" for i in (3, 4, 5)))
    assert [r["iteration"] for r in restore(algo, tmp_path).rows] == [1, 2]
    aside = [json.loads(line) for line in (tmp_path / "metrics.after_000002.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["try"]) for r in aside] == [(3, 1), (4, 1), (3, 2), (4, 2), (5, 2)]


@pytest.mark.parametrize("bad", ['{"env/steps_sampled": 64}', '[1, 2]', '"text"', '{"iteration": "3"}', "[" * 100_000])
def test_a_metrics_line_that_is_not_a_row_is_set_aside_not_a_traceback(tmp_path, monkeypatch, capsys, bad):
    from types import SimpleNamespace

    from rl import checkpoints

    monkeypatch.setattr(checkpoints, "restore_newest", lambda algo, store, **_: (store / "iter_000002", []))
    rows = [json.dumps({"iteration": 1}), bad, json.dumps({"iteration": 2})]
    (tmp_path / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
    assert [r["iteration"] for r in restore(SimpleNamespace(training_iteration=2), tmp_path).rows] == [1, 2]
    assert (tmp_path / "metrics.torn.jsonl").read_text() == bad + "\n"
    assert "metrics.jsonl line 2 is" in capsys.readouterr().err
