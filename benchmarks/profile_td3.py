"""Where our TD3's time goes: cProfile of a short training run, grouped into phases.

    python -m benchmarks.profile_td3 [--config configs/pendulum_td3.yaml] [--steps 6000]

Prints seconds per 1,000 env steps (= 1,000 updates after learning starts) spent under a few
entry points: the learner call (and its backward, Adam, Polyak), RLlib's learner-group plumbing
around it, the env runner (and env.step), the replay buffer, the weight sync.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile

import torch

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/pendulum_td3.yaml")
    parser.add_argument("--steps", type=int, default=6000)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from rl.config import load_config
    from rl.experiment import build_td3_config
    from rl.train import _init_ray

    with tempfile.TemporaryDirectory() as tmp:
        exp = load_config(args.config, [f"experiment.output_dir={tmp}",
                                        "algo.learning_starts=1000", "evaluation.interval_iters=0"])
        _init_ray()
        algo = build_td3_config(exp).build_algo()
        while algo.train()["env_runners"]["num_env_steps_sampled_lifetime"] < 1000:
            pass  # warm-up: no updates yet, not profiled
        profiler = cProfile.Profile()
        steps = 0
        profiler.enable()
        while steps < args.steps:
            before = algo.metrics.peek(("env_runners", "num_env_steps_sampled_lifetime"))
            algo.train()
            steps += algo.metrics.peek(("env_runners", "num_env_steps_sampled_lifetime")) - before
        profiler.disable()
        algo.stop()

    stats = pstats.Stats(profiler)
    total = stats.total_tt
    # Cumulative time of a few well-known entry points (they do not overlap each other).
    entries = {
        "learner call (all)": ("torch_learner.py", "_uncompiled_update"),
        "  of which backward": ("graph.py", "_engine_run_backward"),
        "  of which Adam steps": ("optimizer.py", "wrapper"),
        "  of which Polyak": ("td3_learner.py", "_polyak_update_targets"),
        "learner calls from the replay (all)": ("learner_replay.py", "replay_and_update"),
        "env runner sample (all)": ("single_agent_env_runner.py", "sample"),
        "  of which env.step": ("env_runner.py", "_try_env_step"),
        "replay add": ("replay_buffer.py", "add_chunks"),
        "replay sample": ("replay_buffer.py", "sample"),
        "weight publishing": ("td3.py", "_publish_weights"),
        "torch module forward, anywhere": ("module.py", "_call_impl"),
    }
    per_k = 1000.0 / steps
    print(f"profiled {steps} env steps ({steps} updates), {total:.1f} s in all; seconds per 1k steps:")
    for label, (file_end, func) in entries.items():
        cum = sum(
            v[3] for (f, _, n), v in stats.stats.items() if f.endswith(file_end) and n == func
        )
        print(f"  {label:<28} {cum * per_k:7.2f} s  ({100 * cum / total:4.1f}%)")
    print(f"  {'total':<28} {total * per_k:7.2f} s")


if __name__ == "__main__":
    main()
