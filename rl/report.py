"""The validation report of a run, from its run directory alone:

    python -m rl.report RUN_DIR

writes into RUN_DIR/report/:
    report.md     a PASS/FAIL checklist with the numbers behind each line, and the alerts
    report.png    Q values (with the return bound), returns, losses, episode length
    metrics.csv   every metric per iteration;  alerts.csv  every alert

The checks are made from metrics.jsonl with the run's own `health:` thresholds (config.yaml),
so the report can be made for any run, also one whose monitoring was off or that crashed.
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
from callbacks.health import above_clip_limit, window_collapse
from rl.config import AlgoSection, HealthSection


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


def load_run(run_dir: Path) -> tuple[dict, list[dict], list[dict], dict]:
    """(resolved config, metrics rows, alerts, summary); a missing file is a clear error."""
    for name in ("config.yaml", "metrics.jsonl"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} not found: is {run_dir} a run directory of rl.train?")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return config, rows, read_alerts(run_dir), summary


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(iterations, values) of the rows that report `key`."""
    pairs = [(r["iteration"], r[key]) for r in rows if key in r]
    if not pairs:
        return np.array([]), np.array([])
    its, values = zip(*pairs)
    return np.array(its), np.array(values, dtype=float)


def checks(config: dict, rows: list[dict], alerts: list[dict], summary: dict) -> list[Check]:
    # Sections read one by one: the env itself need not be importable where the report runs.
    health = HealthSection.model_validate(config.get("health", {}))
    algo = AlgoSection.model_validate(config.get("algo", {}))
    learning = [r for r in rows if r.get("env/steps_sampled", 0) > algo.learning_starts]
    out = []

    missing = {k: sum(k not in r for r in learning) for k in health.required_metrics}
    out.append(Check(
        "losses and Q reported every iteration since learning started",
        bool(learning) and not any(missing.values()),
        f"{len(learning)} learning iterations; missing: "
        + (", ".join(f"{k} in {n}" for k, n in missing.items() if n) or "none")
        if learning else "learning never started",
    ))

    watched = ("losses/critic", "losses/actor", "q/q1_mean", "q/q1_max", "q/q2_max")
    bad = sorted({k for r in rows for k in watched if k in r and not math.isfinite(r[k])})
    bad_weights = max((r.get("learner/non_finite_weights", 0) for r in rows), default=0)
    out.append(Check(
        "no NaN or Inf in losses, Q values or weights",
        not bad and bad_weights == 0,
        f"non-finite: {', '.join(bad) or 'none'}; parameters with NaN/Inf at most: {bad_weights:g}",
    ))

    _, q_max = series(rows, "q/q1_max")
    _, q_min = series(rows, "q/q1_min")
    _, excess = series(rows, "health/q_excess")
    lower, upper = series(rows, "health/q_bound_lower")[1], series(rows, "health/q_bound_upper")[1]
    if len(excess):
        worst = float(np.nanmax(np.where(np.isfinite(excess), excess, np.inf)))
        out.append(Check(
            "Q within the discounted return bound",
            worst <= health.q_bound_slack,
            f"Q1 in [{np.nanmin(q_min):,.1f}, {np.nanmax(q_max):,.1f}]; bound [{lower[-1]:,.1f}, "
            f"{upper[-1]:,.1f}]; worst excess {worst:.2f} of the range (allowed {health.q_bound_slack:g})",
        ))
    else:
        out.append(Check("Q within the discounted return bound", not len(q_max), "no Q bound was computed"))

    over = []
    for group, limit in algo.grad_clip.items():
        _, post = series(rows, f"grad/{group}/post_clip_norm")
        if len(post) and above_clip_limit(float(np.nanmax(post)), limit):
            over.append(f"{group}: {np.nanmax(post):.3g} > {limit:g}")
    limits = ", ".join(f"{g} {'none' if v is None else f'{v:g}'}" for g, v in algo.grad_clip.items())
    out.append(Check(
        "post-clip gradient norms within their limits",
        not over,
        ("over: " + "; ".join(over)) if over else f"all within (limits: {limits})",
    ))

    collapse = {
        key: window_collapse(
            [r[key] for r in learning if key in r and math.isfinite(r[key])], health.window_iters, health.collapse_fraction
        )
        for key in ("episode/return_mean", "episode/len_mean")
    }
    returns, lengths = collapse["episode/return_mean"], collapse["episode/len_mean"]
    if returns is None:
        out.append(Check("no return collapse", True, "too few iterations with ended episodes"))
    else:
        out.append(Check(
            "no return collapse",
            not returns[2],
            f"best {health.window_iters}-iteration mean since learning started {returns[0]:,.2f}, "
            f"last {returns[1]:,.2f}"
            + (f"; episode length best {lengths[0]:,.1f}, last {lengths[1]:,.1f}" if lengths else ""),
        ))

    critical = [a for a in alerts if a["level"] == "CRITICAL"]
    out.append(Check(
        "no CRITICAL health alert",
        not critical,
        ", ".join(f"{a['rule']} (iteration {a['iteration']})" for a in critical) or "none",
    ))
    status = summary.get("status", "unknown (no summary.json: the run did not finish)")
    out.append(Check("run completed", status == "completed", f"status: {status}"))
    return out


def plot(rows: list[dict], alerts: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    panels = [
        (axes[0, 0], "Q values", ["q/q1_mean", "q/q1_max", "q/q1_min", "health/q_bound_upper", "health/q_bound_lower"]),
        (axes[0, 1], "Episode return", ["episode/return_mean", "eval/return_mean"]),
        (axes[1, 0], "Losses", ["losses/critic", "losses/actor"]),
        (axes[1, 1], "Episode length", ["episode/len_mean", "eval/len_mean"]),
    ]
    for ax, title, keys in panels:
        for key in keys:
            its, values = series(rows, key)
            if len(its):
                style = "--" if key.startswith("health/") else "-"
                ax.plot(its, values, style, label=key, marker="o" if key.startswith("eval/") else None, markersize=3)
        for alert in alerts:
            ax.axvline(alert["iteration"], color="red" if alert["level"] == "CRITICAL" else "orange", alpha=0.5, lw=1)
        if title in ("Q values", "Losses"):
            ax.set_yscale("symlog")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("training iteration (red/orange lines: CRITICAL/WARN alerts)")
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
    results = checks(config, rows, alerts, summary)
    passed = all(c.passed for c in results)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    plot(rows, alerts, out / "report.png")
    write_csvs(rows, alerts, out)
    failed = [c.name for c in results if not c.passed]
    lines = [
        f"# Validation report: {config['experiment']['name']}",
        "",
        f"Run: `{run_dir}`  ",
        f"Env: `{config['env']['id']}`, {rows[-1].get('env/steps_sampled', 0):,.0f} env steps, "
        f"{len(rows)} iterations" if rows else "No iterations recorded.",
        "",
        f"## Verdict: {'PASS' if passed else 'FAIL'}",
        "",
        ("All checks passed." if passed else "Failed: " + "; ".join(failed) + "."),
        "",
        "| check | result | evidence |",
        "|---|---|---|",
        *[f"| {c.name} | {'PASS' if c.passed else '**FAIL**'} | {c.detail} |" for c in results],
        "",
        "![Q values, returns, losses, episode length](report.png)",
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
