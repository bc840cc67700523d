"""rl/storage.py: a run directory mirrored to a storage URI (file:// here, as s3:// would be)."""

from rl.storage import sync_run_dir


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
