"""One run per directory, one process per run (rl/run_directory.py): `--run-dir` never mixes two
runs, `--resume` writes nothing into a directory that is not a resumable run, a second process
cannot enter a run directory in use, and overrides given at resume are recorded."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rl import checkpoints, run_directory
from rl.config import ConfigError, load_config
from rl.train import main

ROOT = Path(__file__).resolve().parents[1]
PENDULUM = str(ROOT / "configs" / "pendulum_td3.yaml")
SHORT = ["--set", "experiment.stop_env_steps=128", "--set", "algo.learning_starts=64", "--set", "wandb.enabled=false",
         "--set", "evaluation.episodes=1", "--no-progress"]


def listing(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def a_run(run_dir: Path, **changes) -> None:
    """A run directory as a run of pendulum_td3 leaves it (config.yaml, one metrics row)."""
    config = load_config(PENDULUM).to_dict()
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        config[section][key] = value
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"iteration": 1}) + "\n")
    (run_dir / "checkpoints" / "iter_000005").mkdir(parents=True)


def test_run_dir_holding_another_experiment_is_refused_and_left_as_it_was(tmp_path, capsys):
    run_dir = tmp_path / "run"
    a_run(run_dir, algo__gamma=0.9)
    before = listing(run_dir)
    assert main(["--config", PENDULUM, "--run-dir", str(run_dir), *SHORT]) == 2
    err = capsys.readouterr().err
    assert "holds a run of a different experiment (algo.gamma: 0.9 in the run, 0.99 asked" in err
    assert f"--resume {run_dir}" in err
    assert listing(run_dir) == before


def test_run_dir_with_files_that_are_not_a_run_is_refused(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("mine")
    assert main(["--config", PENDULUM, "--run-dir", str(tmp_path), *SHORT]) == 2
    assert "holds files but no run (config.yaml is missing)" in capsys.readouterr().err
    assert listing(tmp_path) == {"thesis.tex": b"mine"}


def test_resume_of_a_directory_that_is_not_a_resumable_run_writes_nothing(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    assert main(["--resume", str(tmp_path)]) == 2
    assert "not a run directory (no config.yaml)" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text(Path(PENDULUM).read_text())
    assert main(["--resume", str(tmp_path)]) == 2
    assert "the run has no checkpoint to resume from yet" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "notes.txt"]


def test_a_second_process_cannot_enter_a_run_directory_in_use(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from rl import run_directory\n"
         f"with run_directory.locked(Path({str(tmp_path)!r})):\n    print('held', flush=True); time.sleep(60)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"{tmp_path} is in use by another training process \(pid {holder.pid}\)"):
            with run_directory.locked(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10
    while True:  # a killed holder's lock is released by the kernel: the run can be resumed at once
        try:
            with run_directory.locked(tmp_path):
                break
        except ConfigError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_overrides_given_at_resume_are_recorded_and_the_config_before_kept(tmp_path, capsys):
    first = load_config(PENDULUM)
    run_directory.record_config(tmp_path, first)
    run_directory.record_config(tmp_path, first)  # unchanged: nothing kept aside
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    resumed = load_config(tmp_path / "config.yaml", ["experiment.stop_env_steps=50000"])
    run_directory.record_config(tmp_path, resumed)
    assert load_config(tmp_path / "config.yaml").experiment.stop_env_steps == 50_000
    (kept,) = tmp_path.glob("config.*.yaml")
    assert load_config(kept).experiment.stop_env_steps == first.experiment.stop_env_steps
    assert "updated with this run's overrides" in capsys.readouterr().err


@pytest.mark.slow
def test_an_attempt_that_died_before_its_first_checkpoint_is_set_aside_not_mixed(ray_local, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["--config", PENDULUM, "--run-dir", str(run_dir), *SHORT]) == 0
    for name in ("checkpoints", "summary.json"):  # as if it had died after two iterations
        path = run_dir / name
        path.unlink() if path.is_file() else __import__("shutil").rmtree(path)
    died = (run_dir / "metrics.jsonl").read_text()
    assert main(["--config", PENDULUM, "--run-dir", str(run_dir), *SHORT]) == 0
    assert "ended before its first checkpoint; its files are in attempt-" in capsys.readouterr().err
    (aside,) = run_dir.glob("attempt-*")
    assert (aside / "metrics.jsonl").read_text() == died
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]  # not 1, 2, 1, 2


def test_a_completed_run_is_not_redone_and_resumes_from_its_final_checkpoint_when_given_more_steps(
        ray_local, tmp_path, capsys):
    """A run shorter than `checkpoint_every_iters` has only `final`. `--resume` (or the same
    `--run-dir` again) without more steps would redo its last iterations over its results: it is
    refused, and nothing changes; with more steps it goes on from `final`, its rows continuing."""
    run_dir = tmp_path / "run"
    assert main(["--config", PENDULUM, "--run-dir", str(run_dir), *SHORT]) == 0
    assert not list((run_dir / "checkpoints").glob("iter_*")) and (run_dir / "checkpoints" / "final").is_dir()
    capsys.readouterr()
    before = listing(run_dir)
    # --resume asks for a run to go on: exit 2; the same --run-dir again (a retried job): done, exit 0
    for again, code in ((["--resume", str(run_dir)], 2),
                        (["--resume", str(run_dir), "--set", "experiment.stop_env_steps=64"], 2),
                        (["--config", PENDULUM, "--run-dir", str(run_dir), *SHORT], 0)):
        assert main(again) == code
        assert "the run already completed 128 env steps" in capsys.readouterr().err
        assert listing(run_dir) == before

    assert main(["--resume", str(run_dir), "--set", "experiment.stop_env_steps=256", "--no-progress"]) == 0
    assert "resume: from final (iteration 2)" in capsys.readouterr().err
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4] and not list(run_dir.glob("metrics.after_*"))
    assert json.loads((run_dir / "summary.json").read_text())["env_steps"] == 256
    assert json.loads((run_dir / "summary.before_000002.json").read_text())["env_steps"] == 128


def test_a_completed_runs_final_checkpoint_is_resumed_only_where_it_is_the_newest(tmp_path):
    """`final` holds the iteration it was written at: a completed run resumed for more steps
    that wrote iter_6 and then died goes on from iter_6, not from the older `final` (4), whatever
    summary.json says; a `final` without its iteration (an older version's) is not guessed at."""
    store = tmp_path / "checkpoints"
    for name, iteration in (("iter_000002", None), ("final", 4), ("iter_000004", None)):
        (store / name).mkdir(parents=True)
        if iteration:
            (store / name / "iteration").write_text(f"{iteration}\n")
    assert [p.name for p in checkpoints.resumable(store)] == ["iter_000002", "iter_000004", "final"]
    (store / "iter_000006").mkdir()
    assert [p.name for p in checkpoints.resumable(store)][-2:] == ["final", "iter_000006"]
    (store / "final" / "iteration").unlink()
    (store / "iter_000004.bak").mkdir()  # a user's copy: no iteration in its name
    assert [p.name for p in checkpoints.resumable(store)] == ["iter_000002", "iter_000004", "iter_000006"]
