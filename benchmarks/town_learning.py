"""Learning on the town: TD3 + CNN runs over several seeds, each judged on driving score against
the baselines on the same routes (the deterministic policy; carla_env/driving_score.py).

    python -m benchmarks.town_learning --seeds 0 1 2 3 4                  # the CI size, 8,000 steps
    python -m benchmarks.town_learning --seeds 0 1 --steps 12000 --set algo.actor_lr=3e-4

Each run: configs/driving_town_td3.yaml at the CI size (benchmarks/health_zoo.py DRIVING_CI_SIZE,
48x48x2 camera, small CNN) unless --full-size, `experiment.seed` = the seed, then 20 routes
(seeds 1000..1019) driven by its final policy, by the constant action and by the route-following
controller. Appends one line per run to benchmarks/results/town_learning.jsonl and prints the
table (driving score, route completion, how routes ended, alerts).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "driving_town_td3.yaml"
ROUTES = range(1000, 1020)


def one_run(seed: int, steps: int, overrides: list[str], full_size: bool, run_dir: Path) -> dict:
    from benchmarks.health_zoo import DRIVING_CI_SIZE
    from callbacks.alerts import read_alerts
    from rl.config import load_config
    from rl.evaluation import evaluate, trained_policy
    from rl.train import train

    size = [] if full_size else [*DRIVING_CI_SIZE]
    exp = load_config(CONFIG, [*size, f"experiment.seed={seed}", f"experiment.stop_env_steps={steps}",
                               f"experiment.output_dir={run_dir}", "wandb.enabled=false", *overrides])
    start = time.monotonic()
    summary = train(exp, run_dir=run_dir / "run", show_progress=False)
    ours = evaluate(exp.env.id, exp.env.kwargs, trained_policy(summary["final_checkpoint"]), ROUTES)
    alerts = read_alerts(run_dir / "run")
    return {"seed": seed, "steps": steps, "overrides": overrides, "full_size": full_size,
            "minutes": round((time.monotonic() - start) / 60, 1), **_scores(ours),
            "alerts": sorted({f"{a['level']} {a['rule']}" for a in alerts if a["level"] != "INFO"})}


def baseline_scores(full_size: bool) -> dict[str, dict]:
    from benchmarks.driving_baselines import baselines
    from benchmarks.health_zoo import DRIVING_CI_SIZE
    from rl.config import load_config
    from rl.evaluation import evaluate

    exp = load_config(CONFIG, [] if full_size else [*DRIVING_CI_SIZE])
    return {name: _scores(evaluate(exp.env.id, exp.env.kwargs, policy, ROUTES))
            for name, policy in baselines(exp.env.id, exp.env.kwargs).items() if name != "random"}


def _scores(result) -> dict:
    return {"driving_score": round(result.driving_score_mean, 3), "route_completion": round(result.route_completion_mean, 3),
            "return": round(result.return_mean, 1), "ends": {k: round(v, 2) for k, v in sorted(result.ends.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--full-size", action="store_true", help="the shipped 84x84x4 camera and CNN")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    base = baseline_scores(args.full_size)
    print(json.dumps(base), flush=True)
    runs = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            run = one_run(seed, args.steps, args.overrides, args.full_size, Path(tmp))
        run["beats_constant"] = run["driving_score"] > base["constant [0, 0]"]["driving_score"]
        runs.append(run)
        with open(RESULTS / "town_learning.jsonl", "a") as f:
            f.write(json.dumps({**run, "baselines": base}) + "\n")
        print(json.dumps(run), flush=True)
    scores = [r["driving_score"] for r in runs]
    print(f"\n| policy | driving score | route completion |\n|---|---|---|")
    for name, b in base.items():
        print(f"| {name} | {b['driving_score']:.3f} | {b['route_completion']:.0%} |")
    for r in runs:
        print(f"| ours, seed {r['seed']} ({r['steps']} steps) | {r['driving_score']:.3f} | {r['route_completion']:.0%} |")
    print(f"\nours: {np.mean(scores):.3f} +- {np.std(scores):.3f}; beats the constant action on "
          f"{sum(r['beats_constant'] for r in runs)} of {len(runs)} seeds")


if __name__ == "__main__":
    main()
