"""The driving table: trained policies against the baselines, on the same seeds and env config.

    python -m benchmarks.driving_baselines                          # baselines, main-job env
    python -m benchmarks.driving_baselines --ci-size                # the CI test's smaller camera
    python -m benchmarks.driving_baselines --config configs/driving_town_td3.yaml   # the town
    python -m benchmarks.driving_baselines --policy "ours, main job=runs/<run>/checkpoints/final"

Baselines (carla_env/controllers.py): random actions, the constant action [0, 0] (keep the lane
and the speed), and a controller that reads the state vector: lane keeping + IDM on the highway,
route following (pure pursuit + IDM, yielding to cars crossing its route) in the town. Every
policy drives the episodes of seeds 1000..1000+N-1: the same traffic and routes for all.
Reported per policy: mean return (and spread), episode length, how episodes ended, mean speed,
and on routes the leaderboard's driving score, route completion and infractions per episode.
Writes benchmarks/results/driving_baselines_<size>.{json,md} (the highway) or
driving_baselines_<config>_<size>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.health_zoo import DRIVING_CI_SIZE
from carla_env import driving_env_schema
from carla_env.config import EmbeddedTownConfig
from carla_env.controllers import LaneKeepingController, RouteFollowingController, constant_policy, random_policy
from carla_env.driving_score import INFRACTIONS
from rl.config import load_config
from rl.evaluation import evaluate, trained_policy

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "driving_embedded_td3.yaml"
SEED0 = 1000
ENDS = ("collision", "off_route", "stuck", "route_complete", "time_limit")


def baselines(env_id: str, env_kwargs: dict) -> dict:
    config = driving_env_schema(env_id).model_validate(env_kwargs)
    controller = (("route following (pure pursuit + IDM)", RouteFollowingController(config))
                  if isinstance(config, EmbeddedTownConfig) else ("lane keeping + IDM", LaneKeepingController(config)))
    return {"random": random_policy(0), "constant [0, 0]": constant_policy((0.0, 0.0)), controller[0]: controller[1]}


def table(rows: dict[str, dict]) -> str:
    routes = any("driving_score" in r for r in rows.values())
    kinds = [k for k in INFRACTIONS if any(r.get(f"infractions_{k}", 0.0) for r in rows.values())] if routes else []
    head = ["policy", *(["driving score", "route completion"] if routes else []), "return (std)", "length", *ENDS,
            "speed m/s", *(f"{k} /ep" for k in kinds)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name, *([f"{r['driving_score']:.3f}", f"{r['route_completion']:.0%}"] if routes else []),
                 f"{r['return']:.1f} ({r['return_std']:.1f})", f"{r['length']:.0f}",
                 *(f"{r.get('end_' + e, 0.0):.0%}" for e in ENDS), f"{r.get('speed_mps', float('nan')):.1f}",
                 *(f"{r.get(f'infractions_{k}', 0.0):.2f}" for k in kinds)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="the experiment whose env is driven")
    parser.add_argument("--ci-size", action="store_true", help="the CI driving test's env (48x48x2 camera)")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--policy", action="append", default=[], metavar="NAME=CHECKPOINT",
                        help="a trained policy: a run's checkpoint directory (e.g. checkpoints/final)")
    args = parser.parse_args(argv)

    exp = load_config(args.config, list(DRIVING_CI_SIZE) if args.ci_size else [])
    policies = baselines(exp.env.id, exp.env.kwargs)
    for spec in args.policy:
        name, _, path = spec.partition("=")
        policies[name] = trained_policy(path)
    seeds = range(SEED0, SEED0 + args.episodes)
    rows = {}
    for name, policy in policies.items():
        rows[name] = evaluate(exp.env.id, exp.env.kwargs, policy, seeds).row()
        print(f"{name}: {rows[name]}", flush=True)

    size = "ci" if args.ci_size else "main"
    if args.config.resolve() != CONFIG:
        size = f"{args.config.stem}_{size}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"driving_baselines_{size}.json").write_text(json.dumps(
        {"env_kwargs": exp.env.kwargs, "seeds": [seeds.start, seeds.stop - 1], "policies": rows}, indent=2))
    markdown = table(rows)
    (RESULTS / f"driving_baselines_{size}.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
