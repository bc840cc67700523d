"""Where alerts go: the console, `<run_dir>/alerts.jsonl` (one JSON object per alert, appended
and flushed at once, so a crash loses none), and W&B (`wandb.alert`)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from callbacks.health import CRITICAL, WARN, Alert
from callbacks.wandb_run import WandbRun

ALERTS_FILE = "alerts.jsonl"
STYLES = {CRITICAL: "bold red", WARN: "yellow"}


class AlertSinks:
    def __init__(self, run_dir: str | Path, wandb_run: WandbRun | None = None):
        self.path = Path(run_dir) / ALERTS_FILE
        self.wandb_run = wandb_run
        self.console = Console(stderr=True, highlight=False)

    def send(self, alert: Alert) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(alert.to_dict()) + "\n")
        except OSError as error:  # a full disk: the alert still reaches the console and W&B
            self.console.print(f"could not append to {self.path}: {error}", style="red")
        self.console.print(
            f"[{alert.level}] iteration {alert.iteration}, {alert.rule}: {alert.message}",
            style=STYLES.get(alert.level),
        )
        if self.wandb_run is not None:
            self.wandb_run.alert(alert)


def read_alerts(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / ALERTS_FILE
    if not path.is_file():
        return []
    alerts = []
    for line in path.read_text().splitlines():
        try:
            alerts.append(json.loads(line))
        except json.JSONDecodeError:  # a line a crash or a full disk cut short
            continue
    return alerts
