"""The driving table: trained policies against the baselines, on the same seeds and env config.

    python -m benchmarks.driving_baselines                          # baselines, main-job env
    python -m benchmarks.driving_baselines --ci-size                # the CI test's smaller camera
    python -m benchmarks.driving_baselines --policy "ours, main job=runs/<run>/checkpoints/final"

Baselines (carla_env/controllers.py): random actions, the constant action [0, 0] (keep the lane
and the speed), and a lane-keeping + IDM controller that reads the state vector. Every policy
drives the episodes of seeds 1000..1000+N-1: the same traffic for all. Reported per policy: mean
return (and spread), episode length, how episodes ended, mean speed. Writes
benchmarks/results/driving_baselines_<size>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.health_zoo import DRIVING_CI_SIZE
from carla_env.config import EmbeddedEnvConfig
from carla_env.controllers import LaneKeepingController, constant_policy, random_policy
from rl.config import load_config
from rl.evaluation import evaluate, trained_policy

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "driving_embedded_td3.yaml"
SEED0 = 1000
ENDS = ("collision", "off_route", "stuck", "time_limit")


def baselines(env_kwargs: dict) -> dict:
    config = EmbeddedEnvConfig.model_validate(env_kwargs)
    return {
        "random": random_policy(0),
        "constant [0, 0]": constant_policy((0.0, 0.0)),
        "lane keeping + IDM": LaneKeepingController(config),
    }


def table(rows: dict[str, dict]) -> str:
    lines = ["| policy | return (std) | length | " + " | ".join(ENDS) + " | speed m/s |",
             "|---|---|---|" + "---|" * len(ENDS) + "---|"]
    for name, r in rows.items():
        ends = " | ".join(f"{r.get('end_' + e, 0.0):.0%}" for e in ENDS)
        lines.append(f"| {name} | {r['return']:.1f} ({r['return_std']:.1f}) | {r['length']:.0f} | {ends} | "
                     f"{r.get('speed_mps', float('nan')):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ci-size", action="store_true", help="the CI driving test's env (48x48x2 camera)")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--policy", action="append", default=[], metavar="NAME=CHECKPOINT",
                        help="a trained policy: a run's checkpoint directory (e.g. checkpoints/final)")
    args = parser.parse_args(argv)

    exp = load_config(CONFIG, list(DRIVING_CI_SIZE) if args.ci_size else [])
    policies = baselines(exp.env.kwargs)
    for spec in args.policy:
        name, _, path = spec.partition("=")
        policies[name] = trained_policy(path)
    seeds = range(SEED0, SEED0 + args.episodes)
    rows = {}
    for name, policy in policies.items():
        rows[name] = evaluate(exp.env.id, exp.env.kwargs, policy, seeds).row()
        print(f"{name}: {rows[name]}", flush=True)

    size = "ci" if args.ci_size else "main"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"driving_baselines_{size}.json").write_text(json.dumps(
        {"env_kwargs": exp.env.kwargs, "seeds": [seeds.start, seeds.stop - 1], "policies": rows}, indent=2))
    markdown = table(rows)
    (RESULTS / f"driving_baselines_{size}.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
