"""Progress output for long runs: a live bar on a terminal, a plain line every few seconds in logs."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

# (stable metric name, short label, format) shown on the progress line
SHOWN = (
    ("episode/return_mean", "return", "{:.1f}"),
    ("eval/return_mean", "eval", "{:.1f}"),
    ("eval/driving_score", "eval DS", "{:.2f}"),  # envs that drive routes (the town)
    ("losses/critic", "critic", "{:.3g}"),
    ("losses/actor", "actor", "{:.3g}"),
    ("q/q1_mean", "Q1", "{:.3g}"),
    ("perf/env_steps_per_s", "steps/s", "{:.0f}"),
    ("health/alerts_active", "alerts", "{:.0f}"),
)


class TrainingProgress:
    def __init__(self, total_env_steps: int, console: Console | None = None, log_every_s: float = 10.0):
        self.console = console or Console()
        self.total = total_env_steps
        self.log_every_s = log_every_s
        self._last_log = 0.0
        self._latest: dict[str, float] = {}  # last seen value of each shown metric
        self._bar = None
        if self.console.is_terminal:
            self._bar = Progress(
                BarColumn(bar_width=16),
                TextColumn("{task.completed:,.0f}/{task.total:,.0f}"),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
                console=self.console,
            )
            self._task = self._bar.add_task("", total=total_env_steps)
            self._bar.start()

    def _line(self) -> str:
        return "  ".join(
            f"{label} {fmt.format(self._latest[name])}"
            for name, label, fmt in SHOWN
            if name in self._latest
        )

    def update(self, env_steps: float, metrics: dict[str, float]) -> None:
        self._latest.update({k: v for k, v in metrics.items() if any(k == s[0] for s in SHOWN)})
        if self._bar is not None:
            self._bar.update(self._task, completed=env_steps, description=self._line())
        elif time.monotonic() - self._last_log >= self.log_every_s:
            self._last_log = time.monotonic()
            pct = 100.0 * env_steps / self.total
            self.console.print(f"[{pct:5.1f}%] {env_steps:,.0f}/{self.total:,} steps  {self._line()}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
