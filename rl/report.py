"""The validation report of a run, from its run directory alone:

    python -m rl.report RUN_DIR

writes into RUN_DIR/report/:
    report.md     a PASS/FAIL checklist with the numbers behind each line, and the alerts
    report.png    Q values (with the return bound), returns and lengths (against the random
                  warm-up), losses, gradient norms per group (against their limits), actor saturation
    metrics.csv   every metric per iteration;  alerts.csv  every alert

The checklist replays the health rules (callbacks/health.py) over metrics.jsonl with the run's
own `health:` thresholds (config.yaml) and facts (run_facts.json), so the report can be made for
any run, also one whose monitoring was off or that crashed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from callbacks.alerts import read_alerts
from callbacks.health import CRITICAL, FACTS_FILE, INFO, RULE_TITLES, Alert, HealthMonitor, RunFacts
from rl.config import AlgoSection, HealthSection


@dataclass(frozen=True)
class Check:
    name: str
    result: str  # PASS, WARN or FAIL
    detail: str

    @property
    def passed(self) -> bool:
        return self.result != "FAIL"


def load_run(run_dir: Path) -> tuple[dict, list[dict], list[dict], dict]:
    """(resolved config, metrics rows, alerts, summary); a missing file is a clear error."""
    for name in ("config.yaml", "metrics.jsonl"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} not found: is {run_dir} a run directory of rl.train?")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    rows = []
    for n, line in enumerate((run_dir / "metrics.jsonl").read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash or a full disk: the rest stands
            print(f"warning: {run_dir / 'metrics.jsonl'} line {n} is not valid JSON; skipped", file=sys.stderr)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return config, rows, read_alerts(run_dir), summary


def run_facts(run_dir: Path, config: dict) -> RunFacts:
    """The facts the live monitor used (run_facts.json); for an older run without that file,
    the ones the config alone gives (no reward bounds an env documents itself)."""
    path = run_dir / FACTS_FILE
    if path.is_file():
        return RunFacts.from_dict(json.loads(path.read_text()))
    algo = AlgoSection.model_validate(config.get("algo", {}))
    bounds = config.get("env", {}).get("reward_bounds")
    return RunFacts(
        gamma=algo.gamma, grad_clip=dict(algo.grad_clip), learning_starts=algo.learning_starts,
        actor_lr=algo.actor_lr, critic_lr=algo.critic_lr, tau=algo.tau,
        reward_bounds=tuple(bounds) if bounds else None,
        max_episode_steps=config.get("env", {}).get("max_episode_steps"),
    )


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(iterations, values) of the rows that report `key`."""
    pairs = [(r["iteration"], r[key]) for r in rows if key in r]
    if not pairs:
        return np.array([]), np.array([])
    its, values = zip(*pairs)
    return np.array(its), np.array(values, dtype=float)


def replay_monitor(health: HealthSection, facts: RunFacts, rows: list[dict]) -> list[Alert]:
    """The health rules run again over the recorded metrics: every alert the run had (or would
    have had, with monitoring off), from the same code as the live monitor."""
    monitor = HealthMonitor(health, facts)
    return monitor.start_checks() + monitor.replay(rows)


def checks(config: dict, rows: list[dict], alerts: list[dict], summary: dict, facts: RunFacts) -> list[Check]:
    """One line per health rule (FAIL: it raised CRITICAL, WARN: a warning), then the live
    alerts and how the run ended."""
    health = HealthSection.model_validate(config.get("health", {}))
    replayed = replay_monitor(health, facts, rows)
    out = []
    for rule, title in RULE_TITLES.items():
        fired = [a for a in replayed if a.rule == rule and a.level != INFO]
        if not fired:
            out.append(Check(title, "PASS", f"`{rule}`: never raised"))
            continue
        worst = next((a for a in fired if a.level == CRITICAL), fired[0])
        result = "FAIL" if worst.level == CRITICAL else "WARN"
        iterations = ", ".join(str(a.iteration) for a in fired[:5])
        out.append(Check(title, result, f"`{rule}` at iteration {iterations}: {worst.message}"))

    critical = [a for a in alerts if a["level"] == CRITICAL]
    out.append(Check(
        "no CRITICAL health alert during the run",
        "FAIL" if critical else "PASS",
        ", ".join(f"{a['rule']} (iteration {a['iteration']})" for a in critical) or "none",
    ))
    status = summary.get("status", "unknown (no summary.json: the run did not finish)")
    out.append(Check("run completed", "PASS" if status == "completed" else "FAIL", f"status: {status}"))
    return out


def episode_mean(rows: list[dict], key: str) -> float | None:
    """An episode metric's mean over episodes: iterations weighted by the episodes that ended in
    them (as the health monitor weighs them)."""
    pairs = [(r[key], r.get("episode/count", 1.0)) for r in rows if key in r and math.isfinite(r[key])]
    if not pairs or not sum(n for _, n in pairs):
        return None
    return float(np.average([v for v, _ in pairs], weights=[n for _, n in pairs]))


def at_a_glance(rows: list[dict], facts: RunFacts) -> list[str]:
    """The numbers a reader checks first, each next to what it is compared with."""
    lines = []
    learning = [r for r in rows if r.get("env/steps_sampled", 0) > facts.learning_starts]
    warmup = [r for r in rows if r not in learning]

    def mean_of(rs, key):
        mean = episode_mean(rs, key)
        return "n/a" if mean is None else f"{mean:,.2f}"

    lines.append(
        f"- training return: warm-up (uniform random) {mean_of(warmup, 'episode/return_mean')}, "
        f"last 10 learning iterations {mean_of(learning[-10:], 'episode/return_mean')}; episode length "
        f"{mean_of(warmup, 'episode/len_mean')} -> {mean_of(learning[-10:], 'episode/len_mean')}"
    )
    _, q_max = series(rows, "q/q1_max")
    _, q_min = series(rows, "q/q1_min")
    if len(q_max):
        low = f"{np.nanmin(q_min):,.1f}" if len(q_min) else "min not logged"
        lines.append(f"- Q1 range over the run: [{low}, {np.nanmax(q_max):,.1f}]")
    for group, limit in facts.grad_clip.items():
        _, pre = series(rows, f"grad/{group}/pre_clip_norm")
        if len(pre):
            lines.append(
                f"- `{group}` gradient norm before clipping: median {np.nanmedian(pre):,.3g}, max "
                f"{np.nanmax(pre):,.3g} (clip limit: {'none' if limit is None else f'{limit:g}'})"
            )
    _, saturation = series(rows, "learner/actor_saturation")
    if len(saturation):
        lines.append(f"- actor outputs at the bounds: {np.nanmean(saturation[-10:]):.0%} over the last 10 iterations")
    return lines


def plot(rows: list[dict], alerts: list[dict], facts: RunFacts, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(13, 11), sharex=True)
    panels = [
        (axes[0, 0], "Q values", ["q/q1_mean", "q/q1_max", "q/q1_min", "health/q_bound_upper", "health/q_bound_lower"], "symlog"),
        (axes[0, 1], "Training episode return (eval: deterministic)", ["episode/return_mean", "eval/return_mean"], "linear"),
        (axes[1, 0], "Losses", ["losses/critic", "losses/actor"], "symlog"),
        (axes[1, 1], "Episode length", ["episode/len_mean", "eval/len_mean"], "linear"),
        (axes[2, 0], "Gradient norm before clipping (dotted: clip limit)", [f"grad/{g}/pre_clip_norm" for g in facts.grad_clip], "log"),
        (axes[2, 1], "Actor outputs at the tanh bounds (share)", ["learner/actor_saturation"], "linear"),
    ]
    warmup = [r for r in rows if r.get("env/steps_sampled", 0) <= facts.learning_starts]
    for ax, title, keys, scale in panels:
        for key in keys:
            its, values = series(rows, key)
            if len(its):
                style = "--" if key.startswith("health/") else "-"
                line, = ax.plot(its, values, style, label=key, marker="o" if key.startswith("eval/") else None, markersize=3)
                group = key.split("/")[1] if key.startswith("grad/") else None
                if group and facts.grad_clip.get(group) is not None:
                    ax.axhline(facts.grad_clip[group], color=line.get_color(), ls=":", lw=1)
        level = episode_mean(warmup, keys[0]) if keys[0].startswith("episode/") else None
        if level is not None:
            ax.axhline(level, color="grey", ls="--", lw=1, label="uniform warm-up")
        if warmup:
            ax.axvspan(0, warmup[-1]["iteration"], color="grey", alpha=0.08)
        for alert in alerts:
            ax.axvline(alert["iteration"], color="red" if alert["level"] == "CRITICAL" else "orange", alpha=0.5, lw=1)
        if scale == "log" and ax.lines:
            ax.set_yscale("log")
        elif scale == "symlog":
            ax.set_yscale("symlog")
        if keys == ["learner/actor_saturation"]:
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in axes[2]:
        ax.set_xlabel("training iteration (grey: warm-up; red/orange lines: CRITICAL/WARN alerts)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_csvs(rows: list[dict], alerts: list[dict], out: Path) -> None:
    columns = sorted({k for r in rows for k in r}, key=lambda k: (k != "iteration", k))
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "alerts.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["iteration", "level", "rule", "message"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(alerts)


def write_report(run_dir: Path) -> tuple[bool, Path]:
    """Writes RUN_DIR/report/; returns (passed, path of report.md)."""
    config, rows, alerts, summary = load_run(run_dir)
    facts = run_facts(run_dir, config)
    results = checks(config, rows, alerts, summary, facts)
    passed = all(c.passed for c in results)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    plot(rows, alerts, facts, out / "report.png")
    write_csvs(rows, alerts, out)
    failed = [c.name for c in results if not c.passed]
    warned = [c.name for c in results if c.result == "WARN"]
    lines = [
        f"# Validation report: {config.get('experiment', {}).get('name', run_dir.name)}",
        "",
        f"Run: `{run_dir}`  ",
        f"Env: `{config.get('env', {}).get('id', '?')}`, {rows[-1].get('env/steps_sampled', 0):,.0f} env steps, "
        f"{len(rows)} iterations" if rows else "No iterations recorded.",
        "",
        f"## Verdict: {'PASS' if passed else 'FAIL'}",
        "",
        ("All checks passed." if passed else "Failed: " + "; ".join(failed) + ".")
        + (f" Warnings: {'; '.join(warned)}." if warned else ""),
        "",
        "## At a glance",
        "",
        *at_a_glance(rows, facts),
        "",
        "## Checklist",
        "",
        "Every health rule, replayed over `metrics.jsonl` with this run's thresholds.",
        "",
        "| check | result | evidence |",
        "|---|---|---|",
        *[f"| {c.name} | {'**FAIL**' if c.result == 'FAIL' else c.result} | {c.detail.replace('|', '/')} |" for c in results],
        "",
        "![Q values, returns, losses, episode length, gradient norms, actor saturation](report.png)",
        "",
        "## Alerts",
        "",
        *([f"- **{a['level']}** iteration {a['iteration']}, `{a['rule']}`: {a['message']}" for a in alerts] or ["None."]),
        "",
        "Series: `metrics.csv` (every metric per iteration), `alerts.csv`.",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return passed, path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl.report", description="validation report of a run")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        passed, path = write_report(args.run_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'PASS' if passed else 'FAIL'}: {path}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
