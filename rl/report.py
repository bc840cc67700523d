"""The validation report of a run, from its run directory alone:

    python -m rl.report RUN_DIR [--out DIR]

writes into RUN_DIR/report/ (or DIR):
    report.md     a PASS/FAIL checklist with the numbers behind each line, and the alerts
    report.png    Q values (with the return bound), returns and lengths (against the random
                  warm-up), losses, gradient norms per group (against their limits), actor saturation
    metrics.csv   every metric per iteration;  alerts.csv  every alert

Exit status: 0 the verdict is PASS, 1 it is FAIL, 2 no report was made (a file of the run is
missing or damaged, or the report cannot be written there; one line says which and what was
expected). So CI can tell a failed run from a report that could not be made.

The checklist replays the health rules (callbacks/health.py) over metrics.jsonl with the run's
own `health:` thresholds (config.yaml) and facts (run_facts.json), so the report can be made for
any run, also one whose monitoring was off or that crashed. A `training_error` the run was
resumed past, to completion, is shown as a note and does not fail it: a killed and resumed run
leaves no alert at all, and the two must be judged alike.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import reprlib
import sys
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import TypeAdapter, ValidationError

from callbacks.alerts import ALERTS_FILE
from callbacks.health import (
    CRITICAL, FACTS_FILE, INFO, RULE_TITLES, TRAINING_ERROR, Alert, HealthMonitor, RunFacts,
)
from common.config import load_yaml, yaml_problem
from rl.config import AlgoSection, HealthSection

EXIT_PASS, EXIT_FAIL, EXIT_NO_REPORT = 0, 1, 2
SECTIONS = ("experiment", "env", "algo", "health")  # the config.yaml sections the report reads
ALERT_FIELDS = {"level": str, "rule": str, "message": str, "iteration": int}


class ReportError(Exception):
    """The run directory cannot be read as a run, or the report not written there. The message
    is one line naming the file (and line, key) and what was expected."""


@dataclass(frozen=True)
class Check:
    name: str
    result: str  # PASS, WARN or FAIL
    detail: str

    @property
    def passed(self) -> bool:
        return self.result != "FAIL"


def _got(value: Any) -> str:
    # reprlib: bounded in length and depth, whatever a damaged file holds
    return f"got {type(value).__name__} {reprlib.repr(value)}"


def _field(record: dict, key: str, kind: type, expected: str, where: str) -> None:
    if key not in record:
        raise ReportError(f'{where}: "{key}" is missing (expected {expected})')
    if type(record[key]) is not kind:  # `type is`: a bool is not a number here
        raise ReportError(f'{where}: "{key}": expected {expected}, {_got(record[key])}')


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:  # another user's run directory, a lost mount
        raise ReportError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not UTF-8 text (a damaged file?)") from None


def _why(error: ValueError | RecursionError) -> str:
    return "JSON nested too deeply" if isinstance(error, RecursionError) else f"not valid JSON ({error})"


def _json_objects(path: Path, cut_short_last_only: bool) -> Iterator[tuple[str, dict]]:
    """(where, object) per line of a JSON-lines file. A line a crash or a full disk cut short
    is skipped with a warning: the rest stands. With `cut_short_last_only` (metrics.jsonl,
    which a resume cleans of such lines) only the last line may be; one before others is
    damage. Any other damage is a ReportError."""
    lines = _read(path).splitlines()
    for n, line in enumerate(lines, 1):
        where = f"{path} line {n}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            if cut_short_last_only and n < len(lines):
                raise ReportError(f"{where}: {_why(e)}, and lines follow it: the file is damaged") from None
            print(f"warning: {where} is not valid JSON (cut short by a crash?); skipped", file=sys.stderr)
            continue
        except (ValueError, RecursionError) as e:  # a number too long to convert, deep nesting
            raise ReportError(f"{where}: {_why(e)}") from None
        if not isinstance(value, dict):
            raise ReportError(f"{where}: expected a JSON object, {_got(value)}")
        yield where, value


def _metrics_row(row: dict, where: str) -> dict:
    _field(row, "iteration", int, "a whole number", where)
    for key, value in row.items():
        if type(value) not in (int, float):
            raise ReportError(f'{where}: "{key}": expected a number, {_got(value)}')
    return row


def _alert(alert: dict, where: str) -> dict:
    for key, kind in ALERT_FIELDS.items():
        _field(alert, key, kind, "a whole number" if kind is int else "a string", where)
    return alert


def _errors(error: ValidationError, prefix: str = "") -> str:
    """A pydantic error on one line: the missing keys, then `key: what is wrong; ...`."""
    def key(e: dict) -> str:
        return prefix + ".".join(map(str, e["loc"]))

    missing = [key(e) for e in error.errors() if e["type"] == "missing"]
    parts = [f"required keys missing: {', '.join(missing)}"] if missing else []
    parts += [
        f"{key(e)}: " + ("unknown key" if e["type"] == "extra_forbidden" else f"{e['msg']} ({_got(e.get('input'))})")
        for e in error.errors() if e["type"] != "missing"
    ]
    return "; ".join(parts[:3]) + (f" (and {len(parts) - 3} more)" if len(parts) > 3 else "")


def _load_config(path: Path) -> dict:
    try:
        config = load_yaml(_read(path))
    except RecursionError:
        raise ReportError(f"{path}: YAML nested too deeply") from None
    except yaml.YAMLError as e:
        raise ReportError(f"{path}: not valid YAML ({yaml_problem(e)})") from None
    if not isinstance(config, dict):
        raise ReportError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)}, ...), {_got(config)}")
    for name in SECTIONS:
        config[name] = {} if config.get(name) is None else config[name]
        if not isinstance(config[name], dict):
            raise ReportError(f"{path}: {name}: expected a mapping, {_got(config[name])}")
    try:
        HealthSection.model_validate(config["health"])
    except ValidationError as e:
        raise ReportError(f"{path}: {_errors(e, 'health.')}") from None
    return config


def _load_summary(path: Path) -> dict:
    """{} for a run that did not finish. rl.train writes summary.json atomically, so a damaged
    one was cut short elsewhere (a copy, a sync): the run's end is then unknown, which fails the
    `run completed` check; it is no reason not to make the report."""
    if not path.is_file():
        return {}
    text = _read(path)
    try:
        summary = json.loads(text)
    except (ValueError, RecursionError):
        summary = None
    if isinstance(summary, dict) and isinstance(summary.get("status"), str):
        return summary
    why = "0 bytes" if not text else "cut short or not JSON" if summary is None else 'not an object with a "status"'
    print(f"warning: {path} is damaged ({why}): how the run ended is unknown", file=sys.stderr)
    return {"status": f"unknown: summary.json is damaged ({why})"}


def load_run(run_dir: Path) -> tuple[dict, list[dict], list[dict], dict]:
    """(resolved config, metrics rows, alerts, summary); a missing or damaged file is a
    ReportError naming it."""
    for name in ("config.yaml", "metrics.jsonl"):
        if not (run_dir / name).is_file():
            raise ReportError(f"{run_dir / name} not found: is {run_dir} a run directory of rl.train?")
    config = _load_config(run_dir / "config.yaml")
    rows = [_metrics_row(row, where) for where, row in _json_objects(run_dir / "metrics.jsonl", True)]
    alerts_path = run_dir / ALERTS_FILE
    alerts = [_alert(a, where) for where, a in _json_objects(alerts_path, False)] if alerts_path.is_file() else []
    return config, rows, alerts, _load_summary(run_dir / "summary.json")


def _facts(data: Any, where: str, prefix: str = "") -> RunFacts:
    if not isinstance(data, dict):
        raise ReportError(f"{where}: expected a JSON object, {_got(data)}")
    try:
        return TypeAdapter(RunFacts).validate_python(data)
    except ValidationError as e:
        raise ReportError(f"{where}: {_errors(e, prefix)}") from None


def run_facts(run_dir: Path, config: dict) -> RunFacts:
    """The facts the live monitor used (run_facts.json); for an older run without that file,
    the ones the config alone gives (no reward bounds an env documents itself)."""
    path = run_dir / FACTS_FILE
    if path.is_file():
        try:
            data = json.loads(_read(path))
        except (ValueError, RecursionError) as e:
            raise ReportError(f"{path}: {_why(e)}") from None
        return _facts(data, str(path))
    try:
        algo = AlgoSection.model_validate(config["algo"])
    except ValidationError as e:
        raise ReportError(f"{run_dir / 'config.yaml'}: {_errors(e, 'algo.')}") from None
    return _facts({
        "gamma": algo.gamma, "grad_clip": dict(algo.grad_clip), "learning_starts": algo.learning_starts,
        "actor_lr": algo.actor_lr, "critic_lr": algo.critic_lr, "tau": algo.tau,
        "reward_bounds": config["env"].get("reward_bounds"),
        "max_episode_steps": config["env"].get("max_episode_steps"),
    }, str(run_dir / "config.yaml"), "env.")


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


def resumed_crashes(alerts: list[dict], rows: list[dict], summary: dict) -> list[dict]:
    """The `training_error` alerts of a run that was resumed past them and then completed. The
    crash is history, not the verdict: a SIGKILLed and resumed run leaves no alert at all, and
    both must be judged alike. A crash with no completion after it still fails."""
    if summary.get("status") != "completed" or not rows:
        return []
    last = max(r["iteration"] for r in rows)
    return [a for a in alerts if a["rule"] == TRAINING_ERROR and a["level"] == CRITICAL and a["iteration"] <= last]


def crash_note(alert: dict) -> str:
    return f"crashed at iteration {alert['iteration']}, resumed (`{TRAINING_ERROR}`: {alert['message']})"


def checks(config: dict, rows: list[dict], alerts: list[dict], summary: dict, facts: RunFacts) -> list[Check]:
    """One line per health rule (FAIL: it raised CRITICAL, WARN: a warning), then the live
    alerts and how the run ended."""
    health = HealthSection.model_validate(config.get("health") or {})
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

    resumed = resumed_crashes(alerts, rows, summary)
    critical = [a for a in alerts if a["level"] == CRITICAL and a not in resumed]
    out.append(Check(
        "no CRITICAL health alert during the run",
        "FAIL" if critical else "PASS",
        "; ".join([", ".join(f"{a['rule']} (iteration {a['iteration']})" for a in critical) or "none"]
                  + [crash_note(a) for a in resumed]),
    ))
    out.append(iterations_recorded(rows, summary))
    status = summary.get("status", "unknown (no summary.json: the run did not finish)")
    out.append(Check("run completed", "PASS" if status == "completed" else "FAIL", f"status: {status}"))
    return out


def iterations_recorded(rows: list[dict], summary: dict) -> Check:
    """Every iteration the run made (summary.json's count, else up to the last row) has exactly
    one row: an iteration without one is an iteration nobody checked."""
    made = summary.get("iterations")
    recorded = Counter(row["iteration"] for row in rows)
    last = made if type(made) is int else max(recorded, default=0)
    missing = [i for i in range(1, last + 1) if i not in recorded]
    repeated = sorted(i for i, n in recorded.items() if n > 1)
    beyond = sorted(i for i in recorded if i > last)  # rows of a resumed leg that never ended
    problems = [f"{what}: {_iterations(numbers)}" for what, numbers in
                (("missing", missing), ("repeated", repeated), (f"past the run's {last}", beyond)) if numbers]
    if not recorded:
        problems = ["no iteration recorded"]
    detail = "; ".join(problems) or f"iterations 1-{last}, one row each"
    return Check("every iteration in metrics.jsonl, once", "FAIL" if problems else "PASS", detail)


def _iterations(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:5])) + (f" and {len(numbers) - 5} more" if len(numbers) > 5 else "")


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

    # Envs that drive routes (the town) get a row for the leaderboard's metrics.
    routes = any("env/driving_score" in row for row in rows)
    fig, axes = plt.subplots(4 if routes else 3, 2, figsize=(13, 14.5 if routes else 11), sharex=True)
    infractions = sorted({k for row in rows for k, v in row.items() if k.startswith("env/infractions/") and v})
    panels = [
        (axes[0, 0], "Q values", ["q/q1_mean", "q/q1_max", "q/q1_min", "health/q_bound_upper", "health/q_bound_lower"], "symlog"),
        (axes[0, 1], "Training episode return (eval: deterministic)", ["episode/return_mean", "eval/return_mean"], "linear"),
        (axes[1, 0], "Losses", ["losses/critic", "losses/actor"], "symlog"),
        (axes[1, 1], "Episode length", ["episode/len_mean", "eval/len_mean"], "linear"),
        (axes[2, 0], "Gradient norm before clipping (dotted: clip limit)", [f"grad/{g}/pre_clip_norm" for g in facts.grad_clip], "log"),
        (axes[2, 1], "Actor outputs at the tanh bounds (share)", ["learner/actor_saturation"], "linear"),
    ]
    if routes:
        panels += [
            (axes[3, 0], "Driving score and route completion (CARLA leaderboard)",
             ["env/driving_score", "eval/driving_score", "env/route_completion", "eval/route_completion"], "linear"),
            (axes[3, 1], "Infractions per training episode", infractions or ["env/infractions/collision_vehicle"], "linear"),
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
        if ax.get_legend_handles_labels()[0]:  # alert lines alone have no labels
            ax.legend(fontsize=7)
    for ax in axes[-1]:
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


def write_report(run_dir: Path, out: Path | None = None) -> tuple[bool, Path]:
    """Writes RUN_DIR/report/ (or `out`); returns (passed, path of report.md). A run that cannot
    be read, or a report that cannot be written, is a ReportError."""
    config, rows, alerts, summary = load_run(run_dir)
    facts = run_facts(run_dir, config)
    results = checks(config, rows, alerts, summary, facts)
    passed = all(c.passed for c in results)
    failed = [c.name for c in results if not c.passed]
    warned = [c.name for c in results if c.result == "WARN"]
    lines = [
        f"# Validation report: {config['experiment'].get('name', run_dir.name)}",
        "",
        f"Run: `{run_dir}`  ",
        f"Env: `{config['env'].get('id', '?')}`, {rows[-1].get('env/steps_sampled', 0):,.0f} env steps, "
        f"{len(rows)} iterations" if rows else "No iterations recorded.",
        "",
        f"## Verdict: {'PASS' if passed else 'FAIL'}",
        "",
        ("All checks passed." if passed else "Failed: " + "; ".join(failed) + ".")
        + (f" Warnings: {'; '.join(warned)}." if warned else ""),
        *[f"Note: {crash_note(a)}; it completed." for a in resumed_crashes(alerts, rows, summary)],
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
    out = out or run_dir / "report"
    path = out / "report.md"
    try:
        out.mkdir(parents=True, exist_ok=True)
        plot(rows, alerts, facts, out / "report.png")
        write_csvs(rows, alerts, out)
        path.write_text("\n".join(lines) + "\n")
    except OSError as e:  # a read-only run directory, another user's, a full disk
        raise ReportError(f"cannot write the report into {out}: {e.strerror or e} "
                          "(--out DIR writes it elsewhere)") from None
    return passed, path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rl.report", description="validation report of a run",
        epilog="exit status: 0 PASS, 1 FAIL, 2 no report made (a missing or damaged file, or --out not writable)",
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, metavar="DIR", help="write the report here (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    try:
        passed, path = write_report(args.run_dir, args.out)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NO_REPORT
    except Exception:  # a bug of ours: its traceback, and still not the exit status of a FAIL
        traceback.print_exc()
        print("error: the report could not be made (the unexpected error above)", file=sys.stderr)
        return EXIT_NO_REPORT
    print(f"{'PASS' if passed else 'FAIL'}: {path}")
    return EXIT_PASS if passed else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
