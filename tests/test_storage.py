"""rl/storage.py: a run directory mirrored to a storage URI (file:// here, as s3:// would be)."""

import threading
import time
from pathlib import Path

import pytest

from rl import storage
from rl.config import ConfigError, load_config
from rl.storage import sync_run_dir

PENDULUM = Path(__file__).resolve().parents[1] / "configs" / "pendulum_td3.yaml"


def test_the_mirror_follows_the_run_including_rotated_checkpoints(tmp_path):
    run = tmp_path / "local" / "run-1"
    (run / "checkpoints" / "iter_000005").mkdir(parents=True)
    (run / "checkpoints" / "iter_000005" / "state.pkl").write_bytes(b"5")
    (run / "metrics.jsonl").write_text('{"iteration": 1}\n')
    uri = f"file://{tmp_path}/bucket/runs"
    assert sync_run_dir(run, uri)
    mirror = tmp_path / "bucket" / "runs" / "run-1"
    assert (mirror / "checkpoints" / "iter_000005" / "state.pkl").read_bytes() == b"5"

    # Rotation: iter_000005 goes, iter_000010 comes; metrics grow.
    (run / "checkpoints" / "iter_000010").mkdir()
    (run / "checkpoints" / "iter_000010" / "state.pkl").write_bytes(b"10")
    (run / "checkpoints" / "iter_000005" / "state.pkl").unlink()
    (run / "checkpoints" / "iter_000005").rmdir()
    (run / "metrics.jsonl").write_text('{"iteration": 1}\n{"iteration": 2}\n')
    assert sync_run_dir(run, uri)
    assert sorted(p.name for p in (mirror / "checkpoints").iterdir()) == ["iter_000010"]
    assert (mirror / "metrics.jsonl").read_text().count("\n") == 2


def test_storage_trouble_is_reported_and_never_raises(tmp_path, capsys):
    run = tmp_path / "run-1"
    (run / "checkpoints").mkdir(parents=True)
    assert not sync_run_dir(run, "nosuchscheme://bucket/runs")
    assert "copying" in capsys.readouterr().err


def test_a_copy_that_hangs_holds_training_up_only_until_its_timeout_or_a_stop(tmp_path, monkeypatch, capsys):
    """pyarrow retries an unreachable gs:// for many minutes, deaf to Ctrl-C: a copy is waited
    for at most `experiment.storage_timeout_s`, or until a stop is asked for, and while it still
    hangs no second one starts."""
    release = threading.Event()
    monkeypatch.setattr(storage, "copy_run_dir", lambda run_dir, uri: release.wait(60))
    run = tmp_path / "run-1"
    started = time.monotonic()
    assert not sync_run_dir(run, "gs://bucket/runs", timeout_s=0.5)
    assert time.monotonic() - started < 5
    assert "did not finish within 0.5 s (experiment.storage_timeout_s)" in capsys.readouterr().err
    started = time.monotonic()
    assert not sync_run_dir(run, "gs://bucket/runs", timeout_s=0.5)  # waits for the first, in its own timeout
    assert time.monotonic() - started < 5 and "the previous copy is still running" in capsys.readouterr().err
    release.set()
    storage._running["gs://bucket/runs"].join()
    assert sync_run_dir(run, "gs://bucket/runs", timeout_s=5)  # the stuck one done: copies again

    release.clear()
    started = time.monotonic()
    assert not sync_run_dir(run, "gs://other/runs", timeout_s=60, stop_requested=lambda: time.monotonic() > started + 0.5)
    assert time.monotonic() - started < 5 and "stop was asked for" in capsys.readouterr().err
    release.set()


def test_a_storage_uri_pyarrow_cannot_open_is_refused_at_load():
    with pytest.raises(ConfigError, match="experiment.storage_uri"):
        load_config(PENDULUM, ["experiment.storage_uri=ftp2://host/x"])
    assert load_config(PENDULUM, ["experiment.storage_uri=gs://bucket/runs"]).experiment.storage_uri
