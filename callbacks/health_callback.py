"""The RLlib callback that watches a run: every iteration it reads the stable metrics, runs the
health rules (callbacks/health.py), sends new alerts (callbacks/alerts.py), logs everything to
W&B, and marks the result `health/stop` when a CRITICAL alert should end the run.

It runs in the algorithm's process, so it works the same under `rl.train` and under Ray Tune.
Configured by `TD3Config.monitoring(...)` (rl/experiment.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from ray.rllib.callbacks.callbacks import RLlibCallback

from callbacks.alerts import AlertSinks
from callbacks.health import CRITICAL, FACTS_FILE, TRAINING_ERROR, WARN, Alert, HealthMonitor
from callbacks.wandb_run import WandbRun
from rl.config import HealthSection, WandbSection
from rl.metrics import HEALTH_RESULTS, summarize


class HealthCallback(RLlibCallback):
    def on_algorithm_init(self, *, algorithm, **kwargs) -> None:
        config = algorithm.config
        self.section = HealthSection.model_validate(config.health_config)
        self.monitor = HealthMonitor(self.section, config.run_facts)
        # For `rl.report`, which replays the rules over metrics.jsonl with the same facts.
        (Path(config.run_dir) / FACTS_FILE).write_text(json.dumps(config.run_facts.to_dict(), indent=2) + "\n")
        self.wandb_run = WandbRun(
            WandbSection.model_validate(config.wandb_config),
            config.run_dir,
            name=config.experiment_config["experiment"]["name"],
            config=config.experiment_config,
        )
        self.sinks = AlertSinks(config.run_dir, self.wandb_run)
        self.fired: dict[str, str] = {}  # rule -> the worst level it alerted at, for W&B's summary
        self.wandb_run.summarize({"health/status": "healthy", "health/rules_fired": ""})
        for alert in self.monitor.start_checks():
            self._send(alert)

    def on_train_result(self, *, algorithm, result: dict, **kwargs) -> None:
        iteration = int(result.get("training_iteration", 0))
        metrics = summarize(result)
        health, alerts = self.monitor.update(iteration, metrics)
        for alert in alerts:
            self._send(alert)
        health["health/stop"] = float(self.section.stop_on_critical and health["health/critical"] > 0)
        result[HEALTH_RESULTS] = health
        self.wandb_run.log({**metrics, **health}, step=iteration)

    def resume(self, rows: list[dict]) -> None:
        """A resumed run: the monitor catches up on the iterations already done (their alerts
        were sent then), so its warm-up baseline and trend windows go on where they were, and
        the W&B run gets the iterations it lost with the process that died."""
        for alert in self.monitor.replay(rows):
            self._record(alert)
        self.wandb_run.backfill(rows)

    def report_error(self, iteration: int, error: str) -> None:
        """Training raised: a CRITICAL alert that says so, through the same sinks as the rules."""
        self._send(Alert(
            CRITICAL, TRAINING_ERROR,
            f"training stopped on an error in iteration {iteration}: {error}. The metrics and "
            "checkpoints written before it are intact; the newest checkpoint is from before it.",
            {}, iteration,
        ))

    def notify(self, level: str, rule: str, iteration: int, message: str) -> None:
        """An event of the run itself (stopped by a signal, resumed without its history), said
        where alerts go: a pod evicted at night is otherwise a run that just went quiet."""
        self._send(Alert(level, rule, message, {}, iteration))

    def _send(self, alert: Alert) -> None:
        self.sinks.send(alert)
        self._record(alert)

    def _record(self, alert: Alert) -> None:
        """The run's health so far, in the W&B summary: a project's runs table shows which runs
        went bad, and why."""
        if alert.level in (WARN, CRITICAL) and self.fired.get(alert.rule) != CRITICAL:
            self.fired[alert.rule] = alert.level
            levels = set(self.fired.values())
            self.wandb_run.summarize({
                "health/status": "critical" if CRITICAL in levels else "warned",
                "health/rules_fired": ", ".join(f"{rule} ({level})" for rule, level in sorted(self.fired.items())),
            })

    def close(self) -> None:
        """Flushes and closes the W&B run (the offline files are complete after this)."""
        self.wandb_run.finish()
