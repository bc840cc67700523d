"""Embedded driving env speed: highway-env raw against our wrapper, the town against the highway,
and sampling with N runners.

    python -m benchmarks.driving_env                       # all parts, default sizes
    python -m benchmarks.driving_env --runners 1 2 4 --iters 8
    python -m benchmarks.driving_env --parts scenarios     # only the town against the highway

1. Wrapper overhead: the same highway-env simulation (our `HighwaySimulator`'s own HighwayEnv,
   so road, traffic, physics and camera are identical) stepped directly, against
   `gym.make("carla_env:EmbeddedDriving-v0")`, which adds measurements, the state vector, reward
   terms, episode ends and frame stacking. Random actions, same seeds, rounds interleaved.
2. Scenarios: the town (`EmbeddedTown-v0`, configs/driving_town_td3.yaml) against the highway
   (`EmbeddedDriving-v0`, configs/driving_embedded_td3.yaml), each at its shipped 84x84x4 camera
   and traffic, driven by its own baseline controller (episodes as long as a driver makes them,
   resets included), rounds interleaved.
3. Sampling throughput: TD3 with the default CNN acting (no learning: `learning_starts` is never
   reached), env steps per second summed over 1, 2, 4 env runners, each its own process.

Writes benchmarks/results/driving_env.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import gymnasium as gym
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "driving_embedded_td3.yaml"
PARTS = ("wrapper", "scenarios", "sampling")


def _steps_per_s(step, reset, steps: int, rng: np.random.Generator) -> float:
    reset(0)
    episode, start = 0, time.perf_counter()
    for _ in range(steps):
        if step(rng.uniform(-1, 1, 2).astype(np.float32)):
            episode += 1
            reset(episode)
    return steps / (time.perf_counter() - start)


def wrapper_overhead(steps: int, rounds: int) -> dict:
    import carla_env  # noqa: F401  (registers the env)
    from carla_env.contract import STEER, THROTTLE_BRAKE

    wrapped = gym.make("carla_env:EmbeddedDriving-v0")
    raw = wrapped.unwrapped.simulator._env  # the very HighwayEnv our wrapper drives

    def raw_step(action):
        _, _, terminated, truncated, _ = raw.step(np.array([action[THROTTLE_BRAKE], action[STEER]]))
        return terminated or truncated or not raw.vehicle.on_road

    def wrapped_step(action):
        _, _, terminated, truncated, _ = wrapped.step(action)
        return terminated or truncated

    raw_rates, wrapped_rates = [], []
    for r in range(rounds):
        raw_rates.append(_steps_per_s(raw_step, lambda s: raw.reset(seed=s), steps, np.random.default_rng(r)))
        wrapped_rates.append(
            _steps_per_s(wrapped_step, lambda s: wrapped.reset(seed=s), steps, np.random.default_rng(r))
        )
    raw_rate, wrapped_rate = float(np.median(raw_rates)), float(np.median(wrapped_rates))
    return {
        "steps_per_round": steps,
        "raw_steps_per_s": raw_rate,
        "wrapped_steps_per_s": wrapped_rate,
        "overhead_pct": 100.0 * (raw_rate / wrapped_rate - 1.0),
        "raw_rounds": raw_rates,
        "wrapped_rounds": wrapped_rates,
    }


def scenario_speed(steps: int, rounds: int) -> dict:
    from benchmarks.driving_baselines import baselines
    from rl.config import load_config

    rates: dict[str, list[float]] = {}
    envs = {}
    for name, config in (("highway", CONFIG), ("town", CONFIG.with_name("driving_town_td3.yaml"))):
        exp = load_config(config, [])
        env = gym.make(exp.env.id, **exp.env.kwargs)
        driver = list(baselines(exp.env.id, exp.env.kwargs).values())[-1]  # the controller
        envs[name] = (env, driver)
    for r in range(rounds):
        for name, (env, driver) in envs.items():
            obs = {}

            def reset(seed, env=env):
                obs["last"] = env.reset(seed=seed)[0]

            def step(_random_action, env=env, driver=driver):
                obs["last"], _, terminated, truncated, _ = env.step(driver(obs["last"]))
                return terminated or truncated

            rates.setdefault(name, []).append(_steps_per_s(step, reset, steps, np.random.default_rng(r)))
    for env, _ in envs.values():
        env.close()
    medians = {name: float(np.median(r)) for name, r in rates.items()}
    return {"steps_per_round": steps, "steps_per_s": medians, "rounds": rates,
            "town_over_highway": medians["town"] / medians["highway"]}


def sampling_throughput(runners: int, iters: int) -> dict:
    import ray

    from rl.config import load_config
    from rl.experiment import build_td3_config

    exp = load_config(
        CONFIG,
        overrides=[
            f"resources.num_env_runners={runners}",
            "algo.learning_starts=100000000",  # act with the CNN, never learn
            "algo.buffer_size=20000",
            "evaluation.interval_iters=0",
        ],
    )
    ray.init(num_cpus=runners + 1, include_dashboard=False)  # logical CPUs: one per runner
    try:
        algo = build_td3_config(exp).build_algo()
        algo.train()  # warm-up: env start-up, first module calls
        start, steps = time.perf_counter(), 0
        for _ in range(iters):
            result = algo.train()
            steps += result["env_runners"]["num_env_steps_sampled"]
        rate = steps / (time.perf_counter() - start)
        algo.stop()
    finally:
        ray.shutdown()
    return {"env_runners": runners, "env_steps": int(steps), "env_steps_per_s": rate}


def write_results(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "driving_env.json").write_text(json.dumps(result, indent=2))
    lines = []
    if "wrapper" in result:
        o = result["wrapper"]
        lines += [
            "| env | steps/s (median of rounds) | rounds |",
            "|---|---|---|",
            f"| highway-env raw | {o['raw_steps_per_s']:.0f} | {', '.join(f'{x:.0f}' for x in o['raw_rounds'])} |",
            f"| EmbeddedDriving-v0 (ours) | {o['wrapped_steps_per_s']:.0f} | "
            f"{', '.join(f'{x:.0f}' for x in o['wrapped_rounds'])} |",
            "",
            f"Wrapper overhead: {o['overhead_pct']:.1f}% (raw / ours - 1).",
            "",
        ]
    if "scenarios" in result:
        o = result["scenarios"]
        lines += ["| scenario (84x84x4, its baseline controller driving) | steps/s (median) | rounds |", "|---|---|---|"]
        lines += [f"| {name} | {o['steps_per_s'][name]:.0f} | {', '.join(f'{x:.0f}' for x in o['rounds'][name])} |"
                  for name in o["steps_per_s"]]
        lines += ["", f"Town / highway: {o['town_over_highway']:.2f}x.", ""]
    if result.get("sampling"):
        lines += ["| env runners | env steps/s, all runners | per runner | scaling vs 1 runner |", "|---|---|---|---|"]
        base = result["sampling"][0]["env_steps_per_s"]
        for s in result["sampling"]:
            rate = s["env_steps_per_s"]
            lines.append(f"| {s['env_runners']} | {rate:.0f} | {rate / s['env_runners']:.0f} | {rate / base:.2f}x |")
    (RESULTS / "driving_env.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="env steps per round, wrapper part")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runners", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--iters", type=int, default=6, help="timed training iterations per runner count")
    parser.add_argument("--parts", nargs="*", choices=PARTS, default=list(PARTS))
    args = parser.parse_args()
    # Parts not run this time keep their last figures.
    saved = RESULTS / "driving_env.json"
    result = json.loads(saved.read_text()) if saved.exists() else {}
    result["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if "wrapper" in args.parts:
        result["wrapper"] = wrapper_overhead(args.steps, args.rounds)
    if "scenarios" in args.parts:
        result["scenarios"] = scenario_speed(args.steps, args.rounds)
    if "sampling" in args.parts:
        result["sampling"] = [sampling_throughput(n, args.iters) for n in args.runners]
    write_results(result)


if __name__ == "__main__":
    main()
