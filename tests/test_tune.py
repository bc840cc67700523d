"""rl.tune: a small real search. One trial is unhealthy on purpose (a critic learning rate of
10): the health monitor stops it and it cannot be the best; the best config is written, loads
and trains. Every shipped search file is loaded from two directories and run as shipped (made
small by the command line); a trial that errors makes the search fail; a search file that is not
a valid YAML mapping, or a distribution with an invalid value, fails at load."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rl.config import ConfigError, load_config
from rl.train import train
from rl.tune import load_search, main, search
from tests.fault_envs import BROKEN_SENSOR_PENDULUM

ROOT = Path(__file__).resolve().parents[1]
PENDULUM = ROOT / "configs" / "pendulum_td3.yaml"
SHIPPED = sorted((ROOT / "configs" / "tune").glob("*.yaml"))


def search_file(tmp_path, **changes) -> Path:
    spec = {
        "name": "lr_check",
        "base": str(PENDULUM),
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


def test_an_output_dir_that_cannot_be_made_fails_at_load(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"output_dir=.*afile/out: .*afile is a file, not a directory"):
        load_search(search_file(tmp_path, output_dir=str(tmp_path / "afile" / "out")))


def test_a_misspelled_metric_fails_at_load_not_after_the_search(tmp_path):
    with pytest.raises(ConfigError, match="metric: no run reports a metric 'episode/retrn_mean'; metrics are episode/return_mean"):
        load_search(search_file(tmp_path, metric="episode/retrn_mean"))
    with pytest.raises(ConfigError, match="metric: no run reports a metric 'eval/retrn_mean'; metrics are eval/return_mean"):
        load_search(search_file(tmp_path, metric="eval/retrn_mean"))
    assert load_search(search_file(tmp_path, metric="eval/driving_score")).metric == "eval/driving_score"


@pytest.mark.parametrize("where", ["repo root", "another directory"])
@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_search_file_loads_from_the_repo_root_and_from_another_directory(
    shipped, where, tmp_path, monkeypatch
):
    # Trials run in directories of their own: base and output_dir must come out absolute.
    monkeypatch.chdir(ROOT if where == "repo root" else tmp_path)
    loaded = load_search(shipped.relative_to(ROOT) if where == "repo root" else shipped)
    assert Path(loaded.base).is_absolute() and Path(loaded.base).is_file()
    assert Path(loaded.output_dir).is_absolute() and Path(loaded.output_dir).is_relative_to(Path.cwd())


def test_base_is_found_next_to_the_search_file_or_in_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "searches").mkdir()
    next_to_it = tmp_path / "searches" / "search.yaml"
    search_file(tmp_path, base="../pendulum.yaml").rename(next_to_it)
    (tmp_path / "pendulum.yaml").write_text(PENDULUM.read_text())
    monkeypatch.chdir(ROOT)
    assert load_search(next_to_it).base == str(tmp_path / "pendulum.yaml")
    # Relative to the current directory, as search files were written before.
    search_file(tmp_path, base="configs/pendulum_td3.yaml", output_dir="runs/x").rename(next_to_it)
    loaded = load_search(next_to_it)
    assert (loaded.base, loaded.output_dir) == (str(PENDULUM), str(ROOT / "runs" / "x"))

    search_file(tmp_path, base="missing.yaml").rename(next_to_it)
    with pytest.raises(ConfigError) as error:
        load_search(next_to_it)
    assert str(error.value) == (
        f"{next_to_it}: base: missing.yaml not found "
        f"(looked for {tmp_path / 'searches' / 'missing.yaml'} and {ROOT / 'missing.yaml'})"
    )


INVALID_VALUES = {
    "a grid's second value": ({"algo.tau": {"grid": [0.005, 2.0]}}, "algo.tau: grid value 2.0 is invalid"),
    "a choice's last value": ({"algo.gamma": {"choice": [0.9, 0.99, 1.0]}}, "algo.gamma: choice value 1.0 is invalid"),
    "a uniform's high": ({"algo.tau": {"uniform": [0.1, 1.5]}}, "algo.tau: uniform value 1.5 is invalid"),
    "a uniform on an int key": ({"algo.policy_delay": {"uniform": [1, 3]}}, "algo.policy_delay: uniform value 1.0 is invalid"),
    "a randint's low": ({"algo.policy_delay": {"randint": [0, 3]}}, "algo.policy_delay: randint value 0 is invalid"),
    "a loguniform from 0": ({"algo.actor_lr": {"loguniform": [0, 1e-3]}}, "algo.actor_lr: loguniform needs 0 < low"),
    "a loguniform upside down": ({"algo.actor_lr": {"loguniform": [1e-3, 1e-4]}}, "algo.actor_lr: loguniform needs low < high"),
    "a uniform of one value": ({"algo.tau": {"uniform": [0.1, 0.1]}}, "algo.tau: uniform needs low < high"),
    "a randint upside down": ({"algo.policy_delay": {"randint": [5, 3]}}, "algo.policy_delay: randint needs low < high"),
    "a randint of floats": ({"algo.policy_delay": {"randint": [1, 2.5]}}, "randint needs [low, high], two integers"),
}


@pytest.mark.parametrize("case", INVALID_VALUES)
def test_every_value_a_distribution_can_give_is_checked_at_load(tmp_path, case):
    searched, message = INVALID_VALUES[case]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_search(search_file(tmp_path, search=searched))


def test_the_command_line_overrides_what_the_file_says(tmp_path):
    loaded = load_search(
        search_file(tmp_path), set={"experiment.stop_env_steps": 640}, num_samples=3, asha={"max_iters": 200}
    )
    assert loaded.set["experiment.stop_env_steps"] == 640 and loaded.set["algo.learning_starts"] == 320
    assert (loaded.num_samples, loaded.asha.max_iters, loaded.asha.grace_iters) == (3, 200, 100)
    assert main(["--config", str(search_file(tmp_path)), "--asha-max-iters", "10"]) == 2  # grace 100 > max 10
    assert main(["--config", str(search_file(tmp_path)), "--set", "algo.gama=0.9"]) == 2


BROKEN_FILES = {
    "binary": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    "NUL bytes": b"name: a\x00b\n",
    "broken YAML": b"name: x\n  base: [\n",
    "a list": b"- name: x\n- base: y\n",
    "a scalar": b"pendulum_search\n",
    "empty": b"",
}


@pytest.mark.parametrize("content", BROKEN_FILES)
def test_a_search_file_that_is_not_a_yaml_mapping_exits_2_with_one_line(tmp_path, content, capsys):
    path = tmp_path / "search.yaml"
    path.write_bytes(BROKEN_FILES[content])
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and err.count("\n") == 1, err


@pytest.mark.slow
def test_a_search_with_an_errored_trial_exits_1_naming_it_and_still_writes_the_best_config(
    ray_local, tmp_path, capsys
):
    # Trial 2's sensor sends NaN from the start: the policy's NaN check raises, training ends
    # ("crashed", which rl.train returns rather than raises).
    path = search_file(
        tmp_path,
        set={"env.id": BROKEN_SENSOR_PENDULUM, "experiment.stop_env_steps": 640, "algo.learning_starts": 320,
             "evaluation.interval_iters": 0, "evaluation.episodes": 1, "wandb.enabled": False},
        search={"env.kwargs.at_step": {"grid": [10**9, 0]}},
    )
    assert main(["--config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert (tmp_path / "tune" / "lr_check" / "best_config.yaml").is_file() and "Best config:" in out
    assert "error: 1 of 2 trials errored:" in err
    assert "  RuntimeError: training crashed: ValueError: the TD3 actor produced non-finite actions" in err
    (error_file,) = map(Path, re.findall(r"^    see (\S+)$", err, re.M))
    assert "env_kwargs_at_step=0_" in error_file.parent.name and error_file.is_file()


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda p: p.name)
def test_a_shipped_search_runs_as_shipped_from_another_directory(shipped, tmp_path):  # about 25 s: not slow
    """`python -m rl.tune --config <the shipped file>`, run where a user might (not the repo
    root), made small by the command line only: 640 env steps, 2 samples, ASHA within them
    (grace = max: no trial is stopped early, so every trial completes)."""
    loaded = load_search(shipped)
    res = load_config(loaded.base).resources
    iterations = 640 // (res.rollout_fragment_length * res.num_envs_per_env_runner * max(res.num_env_runners, 1))
    command = [
        sys.executable, "-m", "rl.tune", "--config", str(shipped), "--num-samples", "2",
        "--set", "experiment.stop_env_steps=640", "--set", "algo.learning_starts=320",
        "--set", "evaluation.episodes=1",
        "--asha-max-iters", str(iterations), "--asha-grace-iters", str(iterations),
    ]
    started = time.monotonic()
    run = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "WANDB_MODE": "offline"}, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = run.communicate(timeout=600)
    finally:
        if run.poll() is None:  # timed out, or the test was interrupted: Ray's processes too
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    print(f"rl.tune ran {time.monotonic() - started:.0f} s")
    assert run.returncode == 0, output[-4000:]
    results = tmp_path / "runs" / "tune" / loaded.name  # output_dir, relative to where it ran
    summaries = [json.loads(p.read_text()) for p in results.glob("*/run/summary.json")]
    assert len(summaries) == 2 and all(s["status"] == "completed" for s in summaries), output[-4000:]
    assert f"Best config: {results / 'best_config.yaml'}" in output
    assert load_config(results / "best_config.yaml").experiment.stop_env_steps == 640


@pytest.mark.slow
def test_search_stops_the_unhealthy_trial_and_writes_a_best_config_that_trains(ray_local, tmp_path):
    best = search(load_search(search_file(tmp_path))).best_config

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


@pytest.mark.slow
def test_an_interrupted_search_exits_130_and_takes_its_best_config_only_from_finished_trials(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) while trial 2 of 2 runs: Tune ends the
    search and marks the cut trial TERMINATED like a finished one. It must not be the best (its
    metric is of a part of its run), and the search must not exit 0 as if it were done."""
    path = search_file(
        tmp_path,
        set={"experiment.stop_env_steps": 640, "algo.learning_starts": 320, "evaluation.interval_iters": 0,
             "evaluation.episodes": 1, "wandb.enabled": False},
        # trial 2 would run for an hour; its early returns beat trial 1's (no learning yet)
        search={"experiment.stop_env_steps": {"grid": [640, 400_000]}, "algo.learning_starts": {"grid": [320]}},
        mode="min", max_concurrent_trials=1,
    )
    run = subprocess.Popen([sys.executable, "-m", "rl.tune", "--config", str(path)], cwd=ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        # until trial 2 has reported the metric: without the fix, it would be a candidate for the best
        while not any("400000" in p.parent.parent.name and "episode/return_mean" in p.read_text()
                      for p in (tmp_path / "tune").glob("*/*/run/metrics.jsonl")):
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.5)
        os.killpg(run.pid, signal.SIGINT)
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 130, out + err
    assert "the search was interrupted: 1 of 2 trials did not finish; the best config is the best of those" in err
    best = tmp_path / "tune" / "lr_check" / "best_config.yaml"
    assert "(1 healthy of 2; the search was interrupted, 1 trials did not finish)" in best.read_text()
    assert load_config(best).experiment.stop_env_steps == 640
