"""Checkpoints that survive what kills runs: a full disk in the middle of writing one, a process
killed while writing one, a checkpoint damaged later. The run keeps every older checkpoint, and
resuming takes the newest one that loads, exactly (rl/checkpoints.py)."""

import errno
import json
import os
import pickle
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rl import checkpoints
from rl.config import load_config
from rl.experiment import build_td3_config
from rl.train import restore, train

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["algo.learning_starts=128", "evaluation.interval_iters=0", "evaluation.episodes=1", "wandb.enabled=false"]


def fresh_algo():
    return build_td3_config(load_config(ROOT / "configs" / "pendulum_td3.yaml", OVERRIDES)).build_algo()


@pytest.fixture
def algo(ray_local):
    algo = fresh_algo()
    yield algo
    algo.stop()


def assert_resumes_from_the_first_iteration(store: Path) -> None:
    """A new algorithm resumed from `store` gets iter_000001: one iteration, its 64 transitions."""
    resumed = fresh_algo()
    try:
        assert checkpoints.restore_newest(resumed, store)[0].name == "iter_000001"
        assert resumed.training_iteration == 1 and len(resumed.replay) == 64
    finally:
        resumed.stop()


def same_buffer(a, b) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(column[: len(a)], b._leaves()[path][: len(b)]) for path, column in a._leaves().items()
    )


def test_a_disk_that_fills_while_a_checkpoint_is_written_leaves_the_older_ones_to_resume_from(algo, tmp_path, monkeypatch):
    store = tmp_path / "checkpoints"
    algo.train()
    checkpoints.save(algo, store, "iter_000001", keep=3)
    algo.train()

    real_save = np.save

    def disk_full_on_the_second_file(file, array, *args, **kwargs):
        if "rows_" in str(file) and "actions" not in str(file):
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_save(file, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", disk_full_on_the_second_file)
    with pytest.raises(OSError, match="No space left"):
        checkpoints.save(algo, store, "iter_000002", keep=3)
    monkeypatch.undo()
    # Nothing under the new name, nothing half-written left, the older checkpoint untouched.
    assert sorted(p.name for p in store.iterdir()) == ["iter_000001", "replay"]
    assert [p.name for p in (store / "replay" / "shard0").iterdir()] == ["rows_0000000000000_0000000000064"]

    assert_resumes_from_the_first_iteration(store)
    # The run itself can go on checkpointing once there is space again.
    checkpoints.save(algo, store, "iter_000002", keep=3)
    assert json.loads((store / "iter_000002" / "replay.json").read_text())["shards"][0]["chunks"] == [
        "rows_0000000000000_0000000000064", "rows_0000000000064_0000000000128"]


def test_resume_skips_a_checkpoint_that_does_not_load_and_says_why(algo, tmp_path, capsys):
    store = tmp_path / "checkpoints"
    for i in (1, 2, 3):
        algo.train()
        checkpoints.save(algo, store, f"iter_{i:06d}", keep=5)
    # iter 3: cut short as a pre-atomic writer or a damaged disk leaves it; iter 2: its replay rows lost.
    state = store / "iter_000003" / "algorithm_state.pkl"
    state.write_bytes(state.read_bytes()[:100])
    shutil.rmtree(store / "replay" / "shard0" / "rows_0000000000064_0000000000128")

    assert_resumes_from_the_first_iteration(store)
    err = capsys.readouterr().err
    assert "skipped checkpoint iter_000003, it does not load (UnpicklingError" in err or \
        "skipped checkpoint iter_000003, it does not load (EOFError" in err, err
    assert "skipped checkpoint iter_000002, it does not load (ValueError: replay chunk" in err, err


def test_replay_chunks_are_shared_by_checkpoints_and_deleted_when_none_needs_them(algo, tmp_path):
    store = tmp_path / "checkpoints"
    sizes = []
    for i in range(1, 5):
        algo.train()
        checkpoints.save(algo, store, f"iter_{i:06d}", keep=2)
        sizes.append(sum(f.stat().st_size for f in (store / "replay").rglob("*.npy")))
    # Each checkpoint wrote only its own iteration's 64 rows; the chunks of iterations 1 and 2
    # stay, needed by iter 3 and 4 (their buffer holds every row so far).
    assert sorted(p.name for p in store.iterdir()) == ["iter_000003", "iter_000004", "replay"]
    assert len(list((store / "replay" / "shard0").iterdir())) == 4
    assert sizes[1] == 2 * sizes[0] and sizes[3] == 4 * sizes[0]

    resumed = fresh_algo()
    try:
        checkpoints.restore_newest(resumed, store)
        # The replay lives in the learner (here, in this process).
        before, after = algo.learner_group._learner.replay, resumed.learner_group._learner.replay
        assert same_buffer(before, after)
        assert after._rng.bit_generator.state == before._rng.bit_generator.state
    finally:
        resumed.stop()


KILLED_WHILE_WRITING = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    real_save = np.save

    def save_half_then_die(file, array, *args, **kwargs):
        if str(file).endswith("_0000000000640/obs.npy"):  # iteration 10's new replay rows
            with open(file, "wb") as f:
                f.write(np.ascontiguousarray(array).tobytes()[: array.nbytes // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(file, array, *args, **kwargs)

    np.save = save_half_then_die
    from rl.train import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_a_process_killed_while_writing_a_checkpoint_resumes_from_the_one_before(ray_local, tmp_path, capsys):
    run_dir = tmp_path / "run"
    sets = [*OVERRIDES, "experiment.stop_env_steps=1280", "experiment.checkpoint_every_iters=5",
            "experiment.keep_checkpoints=2", "algo.learning_starts=320"]
    run = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_WRITING, "--config", "configs/pendulum_td3.yaml", "--run-dir", str(run_dir),
         "--no-progress", *[a for s in sets for a in ("--set", s)]],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    store = run_dir / "checkpoints"
    assert sorted(p.name for p in store.iterdir()) == [".partial-iter_000010", "iter_000005", "replay"]
    # A full disk leaves a cut-short last line in metrics.jsonl: set aside, not a crash.
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 11, "env/steps_sa')

    exp = load_config(run_dir / "config.yaml", ["experiment.stop_env_steps=1280"])
    algo = build_td3_config(exp).build_algo()
    try:
        rows = restore(algo, run_dir).rows
        assert algo.training_iteration == rows[-1]["iteration"] == 5 and len(algo.replay) == 320
    finally:
        algo.stop()
    err = capsys.readouterr().err
    assert "metrics.jsonl line 11 is cut short" in err and (run_dir / "metrics.torn.jsonl").is_file()

    summary = train(exp, run_dir=run_dir, show_progress=False, resume=True)
    assert summary["status"] == "completed" and summary["iterations"] == 20
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, 21))
    assert rows[5]["replay/size"] == 320 + 64
    left = sorted(p.name for p in store.iterdir())
    assert left == ["final", "iter_000015", "iter_000020", "replay"]  # the partial one is gone
    assert not [p for p in (store / "replay" / "shard0").iterdir() if p.name.startswith(".partial")]
    assert os.path.getsize(run_dir / "metrics.torn.jsonl") > 0


@pytest.fixture
def small_disk(tmp_path):
    """A file system of its own, 32 MB (tmpfs), that a run can really fill."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()}): needs root; the simulated ENOSPC test still runs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_run_whose_disk_fills_stops_with_a_clear_error_and_resumes_once_there_is_space(ray_local, small_disk, capsys):
    exp = load_config(ROOT / "configs" / "pendulum_td3.yaml", [
        *OVERRIDES, f"experiment.output_dir={small_disk}", "experiment.stop_env_steps=640",
        "experiment.checkpoint_every_iters=2", "algo.learning_starts=64"])
    filler = small_disk / "filler"

    def fill_the_disk_after_the_first_checkpoint(metrics: dict) -> None:
        if metrics["iteration"] == 3:  # iter_000002 is written; leave 100 KB for metrics rows
            free = shutil.disk_usage(small_disk).free
            with open(filler, "wb") as f:
                f.write(b"\0" * (free - 100_000))

    run_dir = small_disk / "run"
    summary = train(exp, run_dir=run_dir, show_progress=False, on_iteration=fill_the_disk_after_the_first_checkpoint)
    assert summary["status"] == "crashed" and "No space left on device" in summary["error"], summary
    assert summary["final_checkpoint"].endswith("iter_000002")
    store = run_dir / "checkpoints"
    assert sorted(p.name for p in store.iterdir()) == ["iter_000002", "replay"]  # nothing half-written
    assert "training_error" in capsys.readouterr().err

    filler.unlink()
    exp = load_config(run_dir / "config.yaml", [])
    summary = train(exp, run_dir=run_dir, show_progress=False, resume=True)
    assert summary["status"] == "completed" and summary["iterations"] == 10
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, 11))
    assert rows[2]["replay/size"] == 3 * 64  # iteration 3 again, after iteration 2's checkpoint


def test_a_damaged_replay_manifest_is_skipped_when_pruning_not_a_crash(tmp_path, capsys):
    """A checkpoint whose replay.json is damaged cannot be resumed from; the next checkpoint's
    pruning says so and keeps what the intact ones need (it used to crash the run)."""
    store = tmp_path / "checkpoints"
    for name, manifest in (("iter_000001", "{not json"), ("iter_000002", '{"shards": [{"chunks": ["rows_a"]}]}'),
                           ("iter_000003", '["a list"]')):
        (store / name).mkdir(parents=True)
        (store / name / checkpoints.REPLAY_MANIFEST).write_text(manifest)
    for chunk in ("rows_a", "rows_b"):
        (store / "replay" / "shard0" / chunk).mkdir(parents=True)
    checkpoints._prune_replay_chunks(store)
    assert [p.name for p in (store / "replay" / "shard0").iterdir()] == ["rows_a"]
    err = capsys.readouterr().err
    assert "iter_000001/replay.json is damaged (JSONDecodeError" in err and "iter_000003/replay.json is damaged" in err


def test_a_damaged_replay_chunk_is_named_and_the_weights_resume_with_the_replay_refilled(algo, tmp_path):
    """Checkpoints share their replay chunks, so one chunk cut short makes them all unloadable:
    the error names the chunk and the way out, and `--refill-replay` resumes from the newest
    checkpoint's weights, optimizers and counters with an empty replay."""
    store = tmp_path / "checkpoints"
    for i in (1, 2):
        algo.train()
        checkpoints.save(algo, store, f"iter_{i:06d}", keep=5)
    chunk = store / "replay" / "shard0" / "rows_0000000000000_0000000000064" / "obs.npy"
    chunk.write_bytes(chunk.read_bytes()[:200])

    resumed = fresh_algo()
    try:
        with pytest.raises(FileNotFoundError) as error:
            checkpoints.restore_newest(resumed, store)
        assert f"replay chunk {chunk.parent} is missing or damaged" in str(error.value)
        assert "--refill-replay" in str(error.value)
        assert checkpoints.restore_newest(resumed, store, replay=False)[0].name == "iter_000002"
        assert resumed.training_iteration == 2 and len(resumed.replay) == 0
        resumed.train()  # it samples, refills and goes on
        assert len(resumed.replay) == 64 and resumed.training_iteration == 3
    finally:
        resumed.stop()


PLANTED = """
import os, pickle
class Planted:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
"""


@pytest.mark.parametrize("how", ["world-writable", "another user's", "group-writable by another group"])
def test_a_checkpoint_another_user_could_have_written_is_refused_before_anything_is_loaded(algo, tmp_path, how):
    """Checkpoints are pickles: loading one runs its code. A planted one is not unpickled."""
    store = tmp_path / "run" / "checkpoints"
    algo.train()
    checkpoints.save(algo, store, "iter_000001", keep=5)
    marker = tmp_path / "planted-code-ran"
    namespace = {}
    exec(PLANTED.format(marker=marker), namespace)
    state = store / "iter_000001" / "algorithm_state.pkl"
    state.write_bytes(pickle.dumps(namespace["Planted"]()))
    if how == "world-writable":
        state.chmod(0o666)
    elif how == "another user's":
        os.chown(state, 12345, -1)  # the tests run as root in CI; as another user this would fail
    else:
        os.chown(state, -1, 54321)
        state.chmod(0o664)

    resumed = fresh_algo()
    try:
        with pytest.raises(checkpoints.UntrustedCheckpoint, match=f"resume refused: checkpoint iter_000001 .*{state}"):
            checkpoints.restore_newest(resumed, store)
        assert not marker.exists()
        # Trusted on purpose, it is loaded (and here, its code runs: what the refusal prevents).
        with pytest.raises(Exception):
            checkpoints.restore_newest(resumed, store, trust=True)
        assert marker.exists()
    finally:
        resumed.stop()


def test_a_run_checkpointed_before_the_replay_moved_to_the_learners_resumes(algo, tmp_path):
    """Older runs kept one buffer's chunks in checkpoints/replay/ and a manifest without shards:
    the chunks become shard 0's, and the run resumes and checkpoints on."""
    store = tmp_path / "checkpoints"
    algo.train()
    checkpoints.save(algo, store, "iter_000001", keep=5)
    for chunk in (store / "replay" / "shard0").iterdir():  # the layout before
        chunk.rename(store / "replay" / chunk.name)
    (store / "replay" / "shard0").rmdir()
    manifest = store / "iter_000001" / checkpoints.REPLAY_MANIFEST
    manifest.write_text(json.dumps(json.loads(manifest.read_text())["shards"][0]))

    resumed = fresh_algo()
    try:
        assert checkpoints.restore_newest(resumed, store)[0].name == "iter_000001" and len(resumed.replay) == 64
        resumed.train()
        checkpoints.save(resumed, store, "iter_000002", keep=5)
        assert sorted(p.name for p in (store / "replay").iterdir()) == ["shard0"]
        assert len(list((store / "replay" / "shard0").iterdir())) == 2
    finally:
        resumed.stop()
