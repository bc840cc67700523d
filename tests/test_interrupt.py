"""A run its user stops (Ctrl-C: SIGINT to the terminal's process group) or its host stops
(SIGTERM to the process: pod eviction, `ray job stop`) ends cleanly within Kubernetes' 30 s grace
period: a checkpoint of the last iteration, a summary with status `interrupted`, one line on how
to resume, no traceback, exit 130 or 143; and it resumes from there. A second Ctrl-C stops at once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rl.train import main

ROOT = Path(__file__).resolve().parents[1]
GRACE_S = 30  # Kubernetes' default terminationGracePeriodSeconds


def start_run(run_dir: Path) -> subprocess.Popen:
    overrides = {
        "experiment.stop_env_steps": 100_000,  # runs until stopped
        "experiment.checkpoint_every_iters": 1000,  # no periodic checkpoint: the stop writes one
        "algo.learning_starts": 320,
        "evaluation.interval_iters": 0,
        "wandb.mode": "offline",
    }
    sets = [arg for k, v in overrides.items() for arg in ("--set", f"{k}={v}")]
    command = [sys.executable, "-m", "rl.train", "--config", str(ROOT / "configs" / "pendulum_td3.yaml"),
               "--run-dir", str(run_dir), "--no-progress", *sets]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_iterations(process: subprocess.Popen, run_dir: Path, n: int, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        assert process.poll() is None, f"training exited early: {process.communicate()[1][-2000:]}"
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} iterations in {timeout_s} s")


def stop_with(process: subprocess.Popen, signals: list[tuple[signal.Signals, bool]]) -> tuple[int, str, float]:
    """Sends each (signal, to_the_group) 0.3 s apart; returns the exit code, stderr and the
    seconds from the first signal to the exit."""
    try:
        start = time.monotonic()
        for sig, to_group in signals:
            os.killpg(process.pid, sig) if to_group else os.kill(process.pid, sig)
            time.sleep(0.3)
        _, stderr = process.communicate(timeout=120)
        return process.returncode, stderr, time.monotonic() - start
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, to_group, exit_code",
    [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)],
    ids=["ctrl-c", "sigterm"],
)
def test_a_stopped_run_writes_a_checkpoint_and_summary_and_resumes(ray_local, tmp_path, sig, to_group, exit_code):
    run_dir = tmp_path / "run"
    process = start_run(run_dir)
    wait_for_iterations(process, run_dir, 8)  # past learning_starts: updates are under way
    code, stderr, seconds = stop_with(process, [(sig, to_group)])

    assert code == exit_code, stderr[-3000:]
    assert seconds < GRACE_S
    assert "Traceback" not in stderr, stderr[-3000:]
    assert f"resume: python -m rl.train --resume {run_dir.resolve()}" in stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == sig.name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]["iteration"]
    assert summary["iterations"] == last
    assert summary["final_checkpoint"].endswith(f"iter_{last:06d}")
    alerts = [json.loads(line) for line in (run_dir / "alerts.jsonl").read_text().splitlines()]
    assert [a["level"] for a in alerts if a["rule"] == "interrupted"] == ["INFO"]

    # A resume with a setting the checkpoint cannot take fails, and leaves config.yaml as it was
    # (the plain resume after it must work).
    config = (run_dir / "config.yaml").read_bytes()
    assert main(["--resume", str(run_dir), "--no-progress", "--set", "algo.buffer_size=1000"]) == 2
    assert (run_dir / "config.yaml").read_bytes() == config

    # It goes on from the checkpoint: every iteration once, the counters continued. After SIGTERM
    # the metrics up to it are lost too (a disk replaced): the resumed run says so, and measures
    # its speed from the checkpoint's own counters, not from nothing.
    lose_history = sig == signal.SIGTERM
    if lose_history:
        (run_dir / "metrics.jsonl").unlink()
    stop = int(rows[-1]["env/steps_sampled"]) + 128
    assert main(["--resume", str(run_dir), "--no-progress", "--set", f"experiment.stop_env_steps={stop}"]) == 0
    resumed = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = resumed[-2]
    assert first["iteration"] == last + 1 and first["env/steps_sampled"] == rows[-1]["env/steps_sampled"] + 64
    assert first["perf/env_steps_per_s"] * first["time_s"] == pytest.approx(64)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"iter_{last:06d}") and summary["skipped_checkpoints"] == []
    lost = [a for a in map(json.loads, (run_dir / "alerts.jsonl").read_text().splitlines()) if a["rule"] == "history_lost"]
    if lose_history:
        assert [r["iteration"] for r in resumed] == [last + 1, last + 2]
        assert [a["level"] for a in lost] == ["WARN"] and f"holds 0 of the {last} iterations" in lost[0]["message"]
    else:
        assert [r["iteration"] for r in resumed] == list(range(1, last + 3)) and not lost
