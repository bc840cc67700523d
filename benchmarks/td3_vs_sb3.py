"""Our TD3 against Stable-Baselines3's TD3, same hyperparameters and seeds, side by side.

    python -m benchmarks.td3_vs_sb3                       # Pendulum 20k + HalfCheetah 30k, 3 seeds
    python -m benchmarks.td3_vs_sb3 --envs pendulum --seeds 0
    python -m benchmarks.td3_vs_sb3 --envs pendulum --seeds $(seq 0 9) --jobs 8   # many cores

Both sides take their hyperparameters from the same experiment config in configs/ (SB3's are
derived from it here) and use one torch thread, each run in a fresh process. By default runs go
one at a time, so neither steals the other's cores; `--jobs N` runs N at once on a machine with
the cores for it (returns are the same, seeded; throughput then depends on the neighbours, so
compare it only within one run). Per env, the return table gives mean, spread and Welch's t-test
and the Mann-Whitney U test of ours against SB3 over seeds. Writes
benchmarks/results/<name>.{json,md} (`--name`, default td3_vs_sb3).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.health_zoo import DRIVING_CI_SIZE

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# name -> (config file, env steps, overrides for both sides). HalfCheetah's budget: 30k steps is
# ~5 min per run on 2 cores (the issue's 100k would take ~1.5 h for the 6 runs); pass --steps to
# change it. The town runs at the CI size (48x48x2 camera, small CNN) and is judged on the
# leaderboard's driving score over the same 20 routes on both sides.
BENCHMARKS = {
    "pendulum": ("configs/pendulum_td3.yaml", 20_000, ()),
    "halfcheetah": ("configs/halfcheetah_td3.yaml", 30_000, ()),
    "town": ("configs/driving_town_td3.yaml", 8_000, DRIVING_CI_SIZE),
}
ROUTES = range(1000, 1020)  # driving envs: both sides' final policies drive these episodes


def _routes_evaluation(exp, policy) -> dict:
    """For driving envs on routes: the deterministic policy's return and driving score on ROUTES."""
    from rl.evaluation import evaluate

    result = evaluate(exp.env.id, exp.env.kwargs, policy, ROUTES)
    return {"eval_return": result.return_mean, "driving_score": result.driving_score_mean,
            "route_completion": result.route_completion_mean}


def _drives_routes(exp) -> bool:
    from carla_env import driving_env_schema

    return exp.env.id.startswith("carla_env:") and driving_env_schema(exp.env.id) is not None


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_ours(config_path: str, steps: int, seed: int, overrides: list[str]) -> dict:
    from rl.config import load_config
    from rl.train import train

    with tempfile.TemporaryDirectory() as tmp:
        exp = load_config(
            config_path,
            [f"experiment.stop_env_steps={steps}", f"experiment.seed={seed}",
             f"experiment.output_dir={tmp}", "evaluation.interval_iters=0",
             "wandb.enabled=false", *overrides],  # SB3 logs nowhere either
        )
        summary = train(exp, show_progress=False)
        rows = [json.loads(l) for l in (Path(summary["run_dir"]) / "metrics.jsonl").open()]
        routes = {}
        if _drives_routes(exp):
            from rl.evaluation import trained_policy

            routes = _routes_evaluation(exp, trained_policy(summary["final_checkpoint"]))
    learning = [r for r in rows if "losses/critic" in r]
    phases = ("perf/sample_s", "perf/replay_add_s", "perf/replay_sample_s", "perf/learn_s",
              "perf/weight_sync_s", "perf/iteration_s")
    time_split = {p: sum(r.get(p, 0.0) for r in learning) / max(1, len(learning)) for p in phases}
    return {
        "eval_return": summary["final_eval_return_mean"],
        "env_steps": summary["env_steps"],
        "updates": summary["learner_updates"],
        "train_time_s": summary["train_time_s"],
        "peak_rss_mb": _peak_rss_mb(),
        "time_split_per_iteration_s": time_split,
        **routes,
    }


def run_sb3(config_path: str, steps: int, seed: int, overrides: list[str]) -> dict:
    import gymnasium as gym
    import numpy as np
    from stable_baselines3 import TD3
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.noise import NormalActionNoise
    from torch import nn

    from models.mlp import ACTIVATIONS
    from rl.config import load_config
    from rl.experiment import env_config

    exp = load_config(config_path, overrides)
    algo, model = exp.algo, exp.model
    if algo.actor_lr != algo.critic_lr:
        raise ValueError("SB3's TD3 has one learning rate; the config's actor_lr != critic_lr")
    env = gym.make(exp.env.id, **env_config(exp))
    act_dim = env.action_space.shape[0]
    policy_kwargs = {
        "net_arch": {"pi": list(model.actor_hidden), "qf": list(model.critic_hidden)},
        "activation_fn": ACTIVATIONS[model.activation],
    }
    if isinstance(env.observation_space, gym.spaces.Dict):
        # Image + state: our encoder as SB3's features extractor (one for the actor, one for both
        # critics, as ours), so that both sides train the same network.
        policy_kwargs |= {"features_extractor_class": _our_encoder_class(), "normalize_images": False,
                          "features_extractor_kwargs": {**exp.model.cnn.model_dump(), "activation": model.activation}}
    agent = TD3(
        "MultiInputPolicy" if isinstance(env.observation_space, gym.spaces.Dict) else "MlpPolicy",
        env,
        learning_rate=algo.actor_lr,
        buffer_size=algo.buffer_size,
        learning_starts=algo.learning_starts,
        batch_size=algo.train_batch_size,
        tau=algo.tau,
        gamma=algo.gamma,
        train_freq=1,
        gradient_steps=round(algo.updates_per_env_step),
        # SB3 adds action noise in the [-1, 1]-scaled action space, as our module does.
        action_noise=NormalActionNoise(np.zeros(act_dim), algo.exploration_noise * np.ones(act_dim)),
        policy_delay=algo.policy_delay,
        target_policy_noise=algo.policy_noise,
        target_noise_clip=algo.noise_clip,
        policy_kwargs=policy_kwargs,
        seed=seed,
        device="cpu",
    )
    assert isinstance(agent.policy.actor.mu[0], nn.Linear)
    start = time.monotonic()
    agent.learn(total_timesteps=steps)
    train_time = time.monotonic() - start
    if _drives_routes(exp):
        evaluation = _routes_evaluation(exp, lambda obs: agent.predict(obs, deterministic=True)[0])
    else:
        eval_env = gym.make(exp.env.id, **env_config(exp))
        eval_env.reset(seed=seed + 1000)
        mean_return, _ = evaluate_policy(agent, eval_env, n_eval_episodes=exp.evaluation.episodes, deterministic=True)
        evaluation = {"eval_return": float(mean_return)}
    return {
        **evaluation,
        "env_steps": steps,
        "updates": agent._n_updates,
        "train_time_s": train_time,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _our_encoder_class():
    import torch
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    from models.encoders import ImageStateEncoder

    class OurEncoder(BaseFeaturesExtractor):
        """models/encoders.py's image+state encoder inside SB3. SB3 hands images over as floats
        (0-255 with normalize_images off): back to uint8, exactly, as our encoder takes them."""

        def __init__(self, observation_space, **encoder_kwargs):
            encoder = ImageStateEncoder(observation_space, **encoder_kwargs)
            super().__init__(observation_space, encoder.out_dim)
            self.encoder = encoder

        def forward(self, obs):
            return self.encoder({"image": obs["image"].to(torch.uint8), "state": obs["state"]})

    return OurEncoder


def _worker(impl: str, bench: str, steps: int, seed: int, overrides: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    config_path, _, fixed = BENCHMARKS[bench]
    result = (run_ours if impl == "ours" else run_sb3)(str(ROOT / config_path), steps, seed, [*fixed, *overrides])
    print("RESULT " + json.dumps(result), flush=True)


def _run_in_subprocess(impl: str, bench: str, steps: int, seed: int, overrides: list[str]) -> dict:
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.td3_vs_sb3", "--worker", impl, bench, str(steps), str(seed),
         json.dumps(overrides)],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{impl} {bench} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def compare_returns(ours: list[float], sb3: list[float]) -> dict:
    """Ours against SB3 over seeds: difference of means, Welch's t-test (unequal variances) and
    the Mann-Whitney U test (no normality assumed), two-sided p-values."""
    from scipy import stats

    out = {"diff": _mean(ours) - _mean(sb3), "welch_p": float("nan"), "mannwhitney_p": float("nan")}
    if len(ours) >= 2 and len(sb3) >= 2:
        out["welch_p"] = float(stats.ttest_ind(ours, sb3, equal_var=False).pvalue)
        out["mannwhitney_p"] = float(stats.mannwhitneyu(ours, sb3, alternative="two-sided").pvalue)
    return out


def table(results: dict) -> str:
    header = (
        "| env (steps) | impl | seeds | eval return mean (std) | per seed | env steps/s | "
        "updates/s | peak RSS MB |\n|---|---|---|---|---|---|---|---|\n"
    )
    rows, ratios = [], []
    for bench, by_impl in results.items():
        agg = {}
        for impl, runs in by_impl.items():
            agg[impl] = {
                "ret": _mean([r["eval_return"] for r in runs]),
                "sps": _mean([r["env_steps"] / r["train_time_s"] for r in runs]),
                "ups": _mean([r["updates"] / r["train_time_s"] for r in runs]),
                "rss": max(r["peak_rss_mb"] for r in runs),
            }
            returns = [r["eval_return"] for r in runs]
            per_seed = ", ".join(f"{v:.0f}" for v in returns)
            spread = statistics.stdev(returns) if len(returns) > 1 else 0.0
            steps = runs[0]["env_steps"]
            rows.append(
                f"| {bench} ({steps:,.0f}) | {impl} | {len(runs)} | {agg[impl]['ret']:.1f} "
                f"({spread:.1f}) | {per_seed} | "
                f"{agg[impl]['sps']:.1f} | {agg[impl]['ups']:.1f} | {agg[impl]['rss']:.0f} |"
            )
        if {"ours", "sb3"} <= agg.keys():
            o, s = agg["ours"], agg["sb3"]
            test = compare_returns(*([r["eval_return"] for r in by_impl[i]] for i in ("ours", "sb3")))
            ratios.append(
                f"| {bench} | {test['diff']:+.1f} | {test['welch_p']:.2f} | "
                f"{test['mannwhitney_p']:.2f} | {o['sps'] / s['sps']:.2f}x | "
                f"{o['ups'] / s['ups']:.2f}x | {o['rss'] / s['rss']:.2f}x |"
            )
    out = header + "\n".join(rows) + "\n"
    scored = {b: by for b, by in results.items() if all(r.get("driving_score") is not None for rs in by.values() for r in rs)}
    if scored:  # envs on routes: the leaderboard's driving score, ours against SB3
        out += "\n| env | impl | driving score mean (std) | per seed | route completion |\n|---|---|---|---|---|\n"
        for bench, by_impl in scored.items():
            for impl, runs in by_impl.items():
                ds = [r["driving_score"] for r in runs]
                out += (f"| {bench} | {impl} | {_mean(ds):.3f} ({statistics.stdev(ds) if len(ds) > 1 else 0.0:.3f}) | "
                        f"{', '.join(f'{v:.2f}' for v in ds)} | {_mean([r['route_completion'] for r in runs]):.0%} |\n")
            if {"ours", "sb3"} <= by_impl.keys():
                test = compare_returns(*([r["driving_score"] for r in by_impl[i]] for i in ("ours", "sb3")))
                out += (f"\n{bench}: driving score, ours - SB3 {test['diff']:+.3f}; Welch p {test['welch_p']:.2f}, "
                        f"Mann-Whitney p {test['mannwhitney_p']:.2f}\n")
    if ratios:
        out += (
            "\n| env | return, ours - SB3 | Welch t-test p | Mann-Whitney p | env steps/s, "
            "ours/SB3 | updates/s, ours/SB3 | peak RSS, ours/SB3 |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(ratios) + "\n"
        )
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        impl, bench, steps, seed, *overrides = sys.argv[2:]
        _worker(impl, bench, int(steps), int(seed), json.loads(overrides[0]) if overrides else [])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envs", nargs="+", choices=sorted(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--impls", nargs="+", choices=["ours", "sb3"], default=["ours", "sb3"])
    parser.add_argument("--steps", type=int, help="env steps for every env (default: per env)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for both sides (e.g. resources.rollout_fragment_length=8; "
                        "SB3 reads only the algo/model keys it has)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (default 1: one at a time)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results")
    parser.add_argument("--name", default="td3_vs_sb3", help="results file name, without suffix")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")

    args.out.mkdir(parents=True, exist_ok=True)
    runs = [(bench, seed, impl) for bench in args.envs for seed in args.seeds for impl in args.impls]
    results: dict = {b: {i: [] for i in args.impls} for b in args.envs}

    def one(bench: str, seed: int, impl: str) -> tuple:
        t0 = time.monotonic()
        run = _run_in_subprocess(impl, bench, args.steps or BENCHMARKS[bench][1], seed, args.set)
        return run | {"seed": seed, "jobs": args.jobs, "overrides": args.set}, time.monotonic() - t0

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(one, *r): r for r in runs}
        for future in concurrent.futures.as_completed(futures):
            bench, seed, impl = futures[future]
            run, wall = future.result()
            results[bench][impl].append(run)
            results[bench][impl].sort(key=lambda r: r["seed"])
            print(f"{bench} {impl} seed {seed}: return {run['eval_return']:.1f}, "
                  f"{run['env_steps'] / run['train_time_s']:.1f} env steps/s ({wall:.0f} s)",
                  flush=True)
            (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    md = table({b: {i: r for i, r in by.items() if r} for b, by in results.items()})
    (args.out / f"{args.name}.md").write_text(md)
    print("\n" + md)


if __name__ == "__main__":
    main()
