"""Sampling that overlaps learning: the synchronous and the asynchronous loop against the bound.

    python -m benchmarks.async_sampling                  # about 4 minutes on 2 cores
    python -m benchmarks.async_sampling --tick-ms 30 --iters 24 --ratio 1.0
    python -m benchmarks.async_sampling --runners 8 --ratio 1.0 --learner actor   # 8 stand-in servers

Env runners step a stand-in for a CARLA server (benchmarks/tick_env.py: each step sleeps
`--tick-ms` without using the CPU, as a client waits on the server's tick) with the CI-size
driving CNN (2 x 48x48 frames, two conv layers, 64-64 heads: benchmarks/health_zoo.py). Four runs,
each a fresh algorithm, measured over its iterations after the first `--warmup` ones:

1. sampling alone: no learning (learning never starts): env steps/s, S;
2. learning alone: the learner's updates/s, U, from the synchronous run's learner time (replay
   sampling + learner calls, nothing else);
3. synchronous, 4. asynchronous: env steps/s and updates/s, at `updates_per_env_step` r.

`--learner`: where the learner runs: in the driver (`num_learners: 0`), as an actor (`num_learners:
1`, the cluster's layout: transitions reach its replay once), or as an actor on a GPU.

The ideal overlap bound is the slower side alone: min(S, U / r) env steps/s. Overlap gains most
when the two sides take equally long; `--ratio auto` (the default) sets r = U / S, so that they
do. Goals (issue 14): asynchronous >= 1.4x synchronous and >= 0.85 of the bound, and the replay
ratio within 5% of r. Writes benchmarks/results/async_sampling.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import ray
import torch

from benchmarks.health_zoo import DRIVING_CI_SIZE
from rl.config import load_config
from rl.experiment import build_td3_config

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "driving_embedded_td3.yaml"
NEVER = 10**9
LEARNER = {
    "driver": ("resources.num_learners=0",),
    "actor": ("resources.num_learners=1",),
    "gpu": ("resources.num_learners=1", "resources.num_gpus_per_learner=1"),
}


def experiment(args, *, async_sampling: bool, ratio: float, learning: bool, extra: tuple[str, ...] = ()):
    model = [o for o in DRIVING_CI_SIZE if o.startswith(("model.", "algo.actor_lr", "algo.critic_lr"))]
    return load_config(CONFIG, [
        *model,
        "env.id=benchmarks.tick_env:TickCamera-v0",
        f"env.kwargs={{tick_s: {args.tick_ms / 1000}, width: 48, height: 48, frame_stack: 2}}",
        f"algo.learning_starts={args.learning_starts if learning else NEVER}",
        f"algo.updates_per_env_step={ratio}",
        f"resources.num_env_runners={args.runners}",
        f"resources.rollout_fragment_length={args.fragment}",
        f"resources.async_sampling={str(async_sampling).lower()}",
        "evaluation.interval_iters=0",
        "wandb.enabled=false",
        *LEARNER[args.learner],
        *extra,
    ])


def run(args, *, async_sampling: bool, ratio: float, learning: bool = True, extra: tuple[str, ...] = ()) -> dict:
    """Trains `args.iters` iterations; rates over the ones after the warm-up."""
    exp = experiment(args, async_sampling=async_sampling, ratio=ratio, learning=learning, extra=extra)
    algo = build_td3_config(exp).build_algo()
    try:
        marks, learner_s = [], 0.0
        for i in range(args.iters):
            result = algo.train()
            timers = result.get("timers", {})
            if i >= args.warmup:
                # The timers hold an EMA; `_this_iteration` is this iteration's exact learner time.
                learner_s += algo._this_iteration["sample_s"] + algo._this_iteration["learn_s"]
            learner = result.get("learners", {}).get("default_policy", {})
            marks.append((time.perf_counter(), result["env_runners"]["num_env_steps_sampled_lifetime"],
                          learner.get("num_critic_updates", 0), result.get("replay_ratio"),
                          result.get("policy_lag_mean", 0.0), timers))
            print(f"  iter {i + 1:3d}: {marks[-1][1]:6.0f} steps, {marks[-1][2]:6.0f} updates, "
                  f"ratio {marks[-1][3]}, lag {marks[-1][4]:.0f}", flush=True)
        (t0, steps0, updates0, *_), (t1, steps1, updates1, *_) = marks[args.warmup - 1], marks[-1]
        measured = marks[args.warmup:]
        return {
            "env_steps_per_s": (steps1 - steps0) / (t1 - t0),
            "updates_per_s": (updates1 - updates0) / (t1 - t0),
            "learner_updates_per_s": (updates1 - updates0) / learner_s if learner_s else None,
            "replay_ratio": (updates1 - updates0) / (steps1 - steps0),
            "policy_lag_mean": sum(m[4] for m in measured) / len(measured),
        }
    finally:
        algo.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tick-ms", type=float, default=30.0)
    parser.add_argument("--runners", type=int, default=2)
    parser.add_argument("--fragment", type=int, default=32)
    parser.add_argument("--iters", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--learning-starts", type=int, default=256)
    parser.add_argument("--learner", choices=list(LEARNER), default="driver",
                        help="the learner in the driver, as an actor, or as an actor on a GPU")
    parser.add_argument("--ratio", default="auto", help="updates per env step, or 'auto' (balance the two sides)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ray.init(num_cpus=args.runners + 1, include_dashboard=False, address="local", logging_level="ERROR")
    try:
        print("1. sampling alone")
        sampling = run(args, async_sampling=False, ratio=1.0, learning=False)
        print("2. learning alone (the synchronous run's learner time)")
        probe = run(args, async_sampling=False, ratio=1.0)
        S, U = sampling["env_steps_per_s"], probe["learner_updates_per_s"]
        ratio = round(U / S, 2) if args.ratio == "auto" else float(args.ratio)
        print(f"   S = {S:.1f} env steps/s, U = {U:.1f} updates/s; updates_per_env_step = {ratio}")
        print("3. synchronous")
        sync = run(args, async_sampling=False, ratio=ratio)
        print("4. asynchronous")
        asyn = run(args, async_sampling=True, ratio=ratio)
    finally:
        ray.shutdown()

    bound = min(S, U / ratio)
    rows = {"bound": {"env_steps_per_s": bound, "updates_per_s": bound * ratio}, "synchronous": sync, "asynchronous": asyn}
    meta = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread",
        "cpus": len(__import__("os").sched_getaffinity(0)), "torch": torch.__version__, "ray": ray.__version__,
        "tick_ms": args.tick_ms, "runners": args.runners, "learner": args.learner, "fragment": args.fragment, "iters": args.iters,
        "warmup": args.warmup, "ratio": ratio, "sampling_alone": S, "learning_alone": U,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "async_sampling.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"Sampling alone S = {S:.1f} env steps/s ({args.runners} runners, {args.tick_ms:g} ms ticks, "
        f"the learner: {args.learner}); "
        f"learning alone U = {U:.1f} updates/s; updates_per_env_step = {ratio}.",
        "",
        "| loop | env steps/s | updates/s | of the bound | replay ratio (setting) | policy lag, updates |",
        "|---|---|---|---|---|---|",
        f"| bound: min(S, U / r) | {bound:.1f} | {bound * ratio:.1f} | 1.00 | | |",
    ]
    for name, row in (("synchronous", sync), ("asynchronous", asyn)):
        lines.append(
            f"| {name} | {row['env_steps_per_s']:.1f} | {row['updates_per_s']:.1f} | "
            f"{row['env_steps_per_s'] / bound:.2f} | {row['replay_ratio']:.3f} ({ratio}) | {row['policy_lag_mean']:.0f} |"
        )
    lines += ["", f"asynchronous / synchronous: {asyn['env_steps_per_s'] / sync['env_steps_per_s']:.2f}x env steps/s"]
    (RESULTS / "async_sampling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
