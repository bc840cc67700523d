"""Where alerts go (callbacks/alerts.py) and W&B's failure handling (callbacks/wandb_run.py)."""

import os
import socket
import threading
import time

import pytest

from callbacks.alerts import AlertSinks, read_alerts
from callbacks.health import CRITICAL, Alert
from callbacks.wandb_run import WandbRun, api_key
from rl.config import WandbSection
from tests.wandb_records import read_run, read_summary_and_step_metric, records, run_files

ALERT = Alert(CRITICAL, "non_finite", "NaN in losses/critic.", {"losses/critic": float("nan")}, 7)


def test_alerts_are_appended_to_alerts_jsonl_and_printed(tmp_path, capsys):
    sinks = AlertSinks(tmp_path)
    sinks.send(ALERT)
    sinks.send(Alert("WARN", "tau", "tau too high", {"tau": 0.5}, 0))
    alerts = read_alerts(tmp_path)
    assert [(a["level"], a["rule"], a["iteration"]) for a in alerts] == [(CRITICAL, "non_finite", 7), ("WARN", "tau", 0)]
    assert "[CRITICAL] iteration 7, non_finite: NaN in losses/critic." in capsys.readouterr().err


def test_a_wandb_failure_switches_wandb_off_and_never_raises(tmp_path, monkeypatch, capsys):
    import wandb

    def broken_init(**kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    run = WandbRun(WandbSection(mode="online"), str(tmp_path), "x", {})
    assert not run.active
    run.log({"q/q1_max": 1.0}, step=1)
    run.alert(ALERT)
    run.finish()
    assert "W&B disabled for the rest of this run: ConnectionError" in capsys.readouterr().err


def test_mode_auto_is_offline_without_an_api_key_and_online_with_one_unless_wandb_mode_says(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert WandbRun(WandbSection(enabled=False), "/nonexistent", "x", {}).mode == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert WandbRun(WandbSection(enabled=False), "/nonexistent", "x", {}).mode == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # a key in the environment, but no network here
    assert WandbRun(WandbSection(enabled=False), "/nonexistent", "x", {}).mode == "offline"


def test_a_run_left_open_in_the_process_is_finished_not_reused(tmp_path, monkeypatch):
    """wandb.init, by default, returns a run still open in the process instead of starting the one
    asked for: a reused Tune actor, or a run whose W&B was switched off, would take the next run's
    metrics into its own files."""
    import wandb

    for name in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    left_open = wandb.init(mode="offline", dir=str(tmp_path), project="x", id="leftover0001")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run = WandbRun(WandbSection(mode="offline"), str(run_dir), "x", {})
    run.log({"q/q1_max": 2.0}, step=1)
    run.finish()
    assert left_open._is_finished
    # The W&B service writes the run files; stopping it waits until it has closed them (CI once
    # read this run file, on a loaded machine, before its history row was in it).
    wandb.teardown()
    (path,) = run_files(run_dir)  # its own run, in its own run directory, with its own id
    assert (run_dir / "wandb_run_id").read_text() in path.name
    history, _ = read_run(run_dir)
    kinds = [record.WhichOneof("record_type") for record in records(path)]
    assert [row["q/q1_max"] for row in history] == [2.0], f"{path}: records {kinds}"
    (left_path,) = run_files(tmp_path)
    assert not read_run(tmp_path, left_path)[0], "the metrics went into the run left open"


def test_the_key_can_come_from_a_mounted_secret_file_and_stays_out_of_the_environment(tmp_path, monkeypatch, capsys):
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    secret = "sk-file-" + "3" * 32
    (tmp_path / "api-key").write_text(secret + "\n")  # as `kubectl create secret --from-file` leaves it
    monkeypatch.setenv("WANDB_API_KEY_FILE", str(tmp_path / "api-key"))
    assert api_key() == secret
    assert WandbRun(WandbSection(enabled=False), "/nonexistent", "x", {}).mode == "online"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run = WandbRun(WandbSection(mode="offline"), str(run_dir), "x", {})
    assert run.active
    run.log({"q/q1_max": 1.0}, step=1)
    run.finish()
    assert "WANDB_API_KEY" not in os.environ
    assert not [p for p in run_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    # An optional Secret that was not created: no key, W&B offline, and a line that says so.
    monkeypatch.setenv("WANDB_API_KEY_FILE", str(tmp_path / "missing"))
    assert WandbRun(WandbSection(enabled=False), "/nonexistent", "x", {}).mode == "offline"
    assert "WANDB_API_KEY_FILE=" in capsys.readouterr().err


@pytest.mark.parametrize("server", ["silent", "closed port"])
def test_a_wandb_server_that_does_not_answer_gets_the_run_logged_offline_not_lost(tmp_path, monkeypatch, capsys, server):
    """Online mode, with a key, against a W&B address on 127.0.0.1 that is a stand-in server that
    accepts connections and never answers (a firewall that drops, a server that hangs), or a
    closed port (no network): within init_timeout_s the run is logged offline, charted against
    env steps, with its health in the summary."""
    silent = server == "silent"
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    if silent:
        server.listen(16)
    else:
        server.close()  # nothing listens there: connections are refused
    accepted = []

    def accept_and_never_answer():
        try:
            while True:
                accepted.append(server.accept())
        except OSError:  # closed at the end of the test
            pass

    if silent:
        threading.Thread(target=accept_and_never_answer, daemon=True).start()
    import wandb

    wandb.teardown()  # a W&B service an earlier test started would keep its own server address
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    try:
        start = time.monotonic()
        run = WandbRun(WandbSection(init_timeout_s=5.0), str(tmp_path), "x", {"algo": {"gamma": 0.99}})
        assert run.active and run.mode == "offline" and time.monotonic() - start < 30
        run.log({"env/steps_sampled": 64.0, "q/q1_max": 1.0}, step=1)
        run.summarize({"health/status": "warned", "health/rules_fired": "tau (WARN)"})
        run.finish()
        # The W&B service writes the run file; stopping it waits until the file is closed (under
        # load, finish() returned before the history row was in it: the test read too early).
        wandb.teardown()
    finally:
        server.close()
        for connection, _ in accepted:
            connection.close()
    assert accepted or not silent, "W&B never tried the stand-in server"
    assert "W&B server not reachable" in capsys.readouterr().err
    (path,) = run_files(tmp_path)
    history, _ = read_run(tmp_path, path)
    assert [(h["_step"], h["env/steps_sampled"], h["q/q1_max"]) for h in history] == [(1, 64, 1.0)]
    summary, step_metric = read_summary_and_step_metric(path)
    assert step_metric == "env/steps_sampled"
    assert (summary["health/status"], summary["health/rules_fired"]) == ("warned", "tau (WARN)")


def test_the_api_key_is_never_written_into_the_run_directory(tmp_path, monkeypatch):
    secret = "sk-test-" + "7" * 32
    monkeypatch.setenv("WANDB_API_KEY", secret)
    run = WandbRun(WandbSection(mode="offline"), str(tmp_path), "x", {"algo": {"gamma": 0.99}})
    assert run.active
    run.log({"q/q1_max": 1.0}, step=1)
    run.alert(ALERT)
    run.finish()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files
    assert not [p for p in files if secret.encode() in p.read_bytes()]
