"""How often the CI-size driving test passes: its recipe run N times, each judged as the test
judges it (tests/test_train_driving.py), so a submission's chance of failing CI by chance is a
number, not a guess. Asynchronous sampling is not reproducible: every run differs.

    python -m benchmarks.ci_driving_rate --sampling async --runs 10
    python -m benchmarks.ci_driving_rate --sampling async --runs 10 --set algo.actor_lr=3e-4   # a candidate

Writes benchmarks/results/ci_driving_rate_<sampling>.jsonl (one line per run, appended).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def judge(overrides: list[str], run_dir: Path) -> dict:
    """One run of the test's recipe, and what the test would say of it."""
    from benchmarks.driving_baselines import baselines
    from callbacks.alerts import read_alerts
    from rl.config import load_config
    from rl.evaluation import evaluate, trained_policy
    from rl.train import train
    from tests.test_train_driving import CONFIG, SEEDS, SMALL, STEPS

    exp = load_config(CONFIG, [f"experiment.stop_env_steps={STEPS}", f"experiment.output_dir={run_dir}", *SMALL,
                               *overrides])
    start = time.monotonic()
    summary = train(exp, run_dir=run_dir / "run", show_progress=False)
    constant = evaluate(exp.env.id, exp.env.kwargs, baselines(exp.env.id, exp.env.kwargs)["constant [0, 0]"], SEEDS)
    ours = evaluate(exp.env.id, exp.env.kwargs, trained_policy(summary["final_checkpoint"]), SEEDS)
    alerts = read_alerts(run_dir / "run")
    standing = [w["rule"] for i, w in enumerate(alerts) if w["level"] == "WARN"
                and not any(a["level"] == "INFO" and a["rule"] == w["rule"] for a in alerts[i + 1:])]
    critical = [a["rule"] for a in alerts if a["level"] == "CRITICAL"]
    beats = ours.return_mean > constant.return_mean and ours.length_mean > constant.length_mean
    return {"overrides": overrides, "ours": round(ours.return_mean, 1), "constant": round(constant.return_mean, 1),
            "beats_constant": beats, "warn_standing": standing, "critical": critical,
            "passes": beats and not standing and not critical, "minutes": round((time.monotonic() - start) / 60, 1)}


def main() -> None:
    from tests.test_train_driving import SAMPLING

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sampling", choices=list(SAMPLING), default="async")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"ci_driving_rate_{args.sampling}.jsonl"
    results = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            result = judge([*SAMPLING[args.sampling], *args.overrides], Path(tmp))
        results.append(result)
        with open(out, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"run {i + 1}/{args.runs}: {result}", flush=True)
    passed = sum(r["passes"] for r in results)
    print(f"{passed}/{len(results)} passed ({args.sampling}, {' '.join(args.overrides) or 'the CI recipe'})")


if __name__ == "__main__":
    main()
