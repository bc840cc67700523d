"""The README's cluster command, for real: a local Ray head on 127.0.0.1, a training job sent
with `ray job submit --address http://HEAD:8265 --working-dir . -- python -m rl.train ...`,
its artifacts in the configured storage path. The head is stopped afterwards (only this head:
other Ray instances on the machine are left alone)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's `ray` and `python`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="rayjob_", dir="/tmp")  # short: Ray's socket paths are limited
    gcs, dashboard, agent, agent_grpc, runtime_env, metrics = (free_port() for _ in range(6))
    # Ray 2.60 heads use token authentication. The token goes to the head and the client in the
    # environment, so the test does not depend on (or write) ~/.ray/auth_token.
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    try:
        subprocess.run(
            [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
             "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            check=True, env=env, capture_output=True, timeout=120,
        )
        yield f"http://127.0.0.1:{dashboard}", env
    finally:  # also when the head failed to start half-way
        # Every process of this head carries its temp dir in its command line.
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if temp_dir.encode() in cmdline.read_bytes():
                    os.kill(int(cmdline.parent.name), signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_trains_on_a_local_head_and_leaves_its_artifacts(ray_head, tmp_path):
    address, env = ray_head
    storage = tmp_path / "storage"
    command = [
        str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
        "python", "-m", "rl.train", "--config", "configs/pendulum_td3.yaml", "--no-progress",
        "--set", f"experiment.output_dir={storage}",
        "--set", f"experiment.storage_uri=file://{tmp_path}/bucket/runs",  # as s3://... would be
        "--set", "experiment.stop_env_steps=1280",
        "--set", "algo.learning_starts=320",
        "--set", "evaluation.interval_iters=0",
        "--set", "evaluation.episodes=2",
    ]
    job = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout

    (run_dir,) = storage.glob("pendulum_td3-*")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["env_steps"] >= 1280
    assert (run_dir / "checkpoints" / "final").is_dir()
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == summary["iterations"]
    mirror = tmp_path / "bucket" / "runs" / run_dir.name  # the storage URI got the same run
    assert json.loads((mirror / "summary.json").read_text()) == summary
    assert sorted(p.name for p in (mirror / "checkpoints").iterdir()) == sorted(
        p.name for p in (run_dir / "checkpoints").iterdir()
    )
