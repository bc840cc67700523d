"""Where alerts go (callbacks/alerts.py) and W&B's failure handling (callbacks/wandb_run.py)."""

from callbacks.alerts import AlertSinks, read_alerts
from callbacks.health import CRITICAL, Alert
from callbacks.wandb_run import WandbRun
from rl.config import WandbSection

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


def test_mode_auto_is_offline_without_an_api_key_and_online_with_one(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert WandbRun(WandbSection(enabled=False), "/nonexistent", "x", {}).mode == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert WandbRun(WandbSection(enabled=False), "/nonexistent", "x", {}).mode == "online"


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
