"""The failure zoo: real short training runs, healthy ones and ones that go bad in different ways,
and what the health monitor said about each.

    python -m benchmarks.health_zoo                      # every scenario (about 35 min on 2 cores)
    python -m benchmarks.health_zoo --only seed_replay,frozen_camera
    python -m benchmarks.health_zoo --ci                 # the fast subset that CI runs

Writes benchmarks/results/health_zoo/ (one run directory per scenario, with its report) and
prints the table that benchmarks/README.md shows: scenario, expected verdict, rules fired,
iterations from the failure's visible onset to the first alert of an expected rule and to the
first CRITICAL, and the WARN / CRITICAL counts. A failure counts as caught when one of its
expected rules fires (WARN or CRITICAL) within `MAX_LATENCY` iterations of onset; a healthy run
passes with no CRITICAL, at most one WARN and a PASS report.

Faults are injected in this process (the runs use no remote env runners): env faults wrap
`DrivingEnv.step` and `.reset` from a given env step on; learner faults patch the TD3 learner
from a given env step on. Nothing here is used by training itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from callbacks.health import CONFIG_RULES
from rl.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RESULTS = Path(__file__).resolve().parent / "results" / "health_zoo"
MAX_LATENCY = 5  # iterations from visible onset to the first alert of an expected rule
STEPS_PER_ITERATION = 64  # the configs' rollout_fragment_length, one env runner

# The embedded driving env at the CI test's size (tests/test_train_driving.py uses it too):
# a small camera and CNN, learning after 1,000 uniform random steps.
DRIVING_CI_SIZE = (
    "env.kwargs.camera={width: 48, height: 48, frame_stack: 2}",
    "model.cnn={channels: [16, 32], kernel_sizes: [8, 4], strides: [4, 2], feature_dim: 32}",
    "model.actor_hidden=[64, 64]",
    "model.critic_hidden=[64, 64]",
    "algo.actor_lr=1e-3",
    "algo.critic_lr=1e-3",
    "algo.learning_starts=1000",
    "evaluation.interval_iters=0",
    "resources.learner_torch_threads=1",  # as its tables were measured (the town ships 2)
)
DRIVING_SMALL = (*DRIVING_CI_SIZE, "evaluation.episodes=3", "experiment.stop_env_steps=6000")
# The seed report's settings (../shared/seed/5K_RUN_VALIDATION_REPORT.md): gamma 0.9, tau 0.001,
# lr 3e-4, batch 256, clipping that did not act, and rewards of ~15 a step (~700 over ~50 steps).
SEED_SETTINGS = (
    "algo.gamma=0.9",
    "algo.tau=0.001",
    "algo.actor_lr=3e-4",
    "algo.critic_lr=3e-4",
    "algo.train_batch_size=256",
    "algo.grad_clip={actor.encoder: null, actor.head: null, critic.encoder: null, critic.head: null}",
)


def reward_weights(scale: float) -> str:
    """The driving reward terms, each `scale` times its default weight."""
    defaults = {"progress": 1.0, "lane_centering": 0.3, "collision": 10.0, "off_route": 10.0, "comfort": 0.1}
    terms = ", ".join(f"{k}: {v * scale:g}" for k, v in defaults.items())
    return f"env.kwargs.reward={{{terms}}}"


# --- Faults --------------------------------------------------------------------------------------


@contextlib.contextmanager
def env_fault(transform: Callable, at_step: int) -> Iterator[None]:
    """Wraps DrivingEnv.step and .reset: from the process's env step `at_step` on, every
    observation and reward passes through transform(obs, reward) (a reset's reward: None)."""
    from carla_env.driving_env import DrivingEnv

    real_step, real_reset, steps = DrivingEnv.step, DrivingEnv.reset, 0

    def step(self, action):
        nonlocal steps
        obs, reward, terminated, truncated, info = real_step(self, action)
        steps += 1
        if steps >= at_step:
            obs, reward = transform(obs, reward)
        return obs, reward, terminated, truncated, info

    def reset(self, *, seed=None, options=None):
        obs, info = real_reset(self, seed=seed, options=options)
        return (transform(obs, None)[0] if steps >= at_step else obs), info

    DrivingEnv.step, DrivingEnv.reset = step, reset
    try:
        yield
    finally:
        DrivingEnv.step, DrivingEnv.reset = real_step, real_reset


def frozen_camera(obs, reward):
    """A dead camera: every frame black (the stack fills with zeros)."""
    return {**obs, "image": np.zeros_like(obs["image"])}, reward


def nan_state(obs, reward):
    """A measurement that broke: NaN in the state vector."""
    state = obs["state"].copy()
    state[0] = np.nan
    return {**obs, "state": state}, reward


def flipped_reward(obs, reward):
    """The reward's sign flipped (a refactoring slip): the agent is now paid to crash."""
    return obs, None if reward is None else -reward


@contextlib.contextmanager
def from_step(at_step: int, patches: dict[tuple[type, str], Callable]) -> Iterator[None]:
    """Replaces methods (class, name) -> fault(real_method) for as long as the context is open;
    each fault acts from the iteration whose start has sampled `at_step` env steps (the flag
    `state["active"]`, passed to the fault factories)."""
    from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME

    from rl.td3.td3 import TD3

    state = {"active": False}
    real_step = TD3.training_step

    def training_step(self):
        state["active"] = self.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0) >= at_step
        return real_step(self)

    reals = {key: getattr(*key) for key in patches}
    TD3.training_step = training_step
    for (owner, name), make in patches.items():
        setattr(owner, name, make(reals[(owner, name)], state))
    try:
        yield
    finally:
        TD3.training_step = real_step
        for (owner, name), real in reals.items():
            setattr(owner, name, real)


def learner_fault(kind: str, at_step: int, factor: float = 1.0) -> contextlib.AbstractContextManager:
    """From env step `at_step` on: `lr_spike` multiplies both learning rates by `factor`;
    `frozen_targets` skips the Polyak update (the target networks never move again)."""
    from rl.td3.td3_learner import TD3TorchLearner

    def spiked_apply(real_apply, state):
        def apply_gradients(self, gradients_dict):
            groups = [g for optimizer in self._optimizer_parameters for g in optimizer.param_groups] if state["active"] else []
            for group in groups:
                group["lr"] *= factor
            try:
                return real_apply(self, gradients_dict)
            finally:  # RLlib's schedule owns the lr between steps
                for group in groups:
                    group["lr"] /= factor
        return apply_gradients

    def frozen_polyak(real_polyak, state):
        return lambda self, module_id: None if state["active"] else real_polyak(self, module_id)

    patch = {"lr_spike": ((TD3TorchLearner, "apply_gradients"), spiked_apply),
             "frozen_targets": ((TD3TorchLearner, "_polyak_update_targets"), frozen_polyak)}[kind]
    return from_step(at_step, dict([patch]))


def data_path_fault(kind: str, at_step: int) -> contextlib.AbstractContextManager:
    """From env step `at_step` on, between sampling and learning (rl/td3/learner_replay.py):
    `weights_stale`: the driver stops publishing weights (the runners keep theirs);
    `replay_not_filling`: the learner takes no transitions in; `learner_behind`: the learner
    makes half the updates asked."""
    from rl.td3.learner_replay import LearnerReplay
    from rl.td3.td3 import TD3

    def no_publishing(real, state):
        return lambda self: None if state["active"] else real(self)

    def dropped(real, state):
        return lambda self, chunks: self.replay.stats() if state["active"] else real(self, chunks)

    def halved(real, state):
        return lambda self, num_updates, timesteps: real(self, num_updates // 2 if state["active"] else num_updates, timesteps)

    patch = {"weights_stale": ((TD3, "_publish_weights"), no_publishing),
             "replay_not_filling": ((LearnerReplay, "add_to_replay"), dropped),
             "learner_behind": ((LearnerReplay, "replay_and_update"), halved)}[kind]
    return from_step(at_step, dict([patch]))


# --- Scenarios -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    config: str
    overrides: tuple[str, ...]
    expected: tuple[str, ...] = ()  # rules that count as catching it; () = a healthy run
    fault: Callable[[], contextlib.AbstractContextManager] | None = None
    onset_step: int | None = None  # env step the failure starts; None: when learning starts
    ci: bool = False
    needs: tuple[str, ...] = field(default=())  # python modules the scenario needs (mujoco)

    @property
    def healthy(self) -> bool:
        return not self.expected


DRIVING = "driving_embedded_td3.yaml"
TOWN = "driving_town_td3.yaml"
COLLAPSE_RULES = ("worse_than_warmup", "episode_collapse", "return_collapse")
# The configuration checks that name the seed's causes before its policy collapses.
SEED_CAUSES = ("target_lag", "reward_scale")

SCENARIOS = [
    Scenario("pendulum", "Pendulum-v1, reference TD3", "pendulum_td3.yaml",
             ("experiment.stop_env_steps=12000", "experiment.seed=0", "evaluation.interval_iters=0",
              "evaluation.episodes=3")),
    Scenario("halfcheetah", "HalfCheetah-v5, reference TD3, 25k steps", "halfcheetah_td3.yaml",
             ("experiment.stop_env_steps=25000", "algo.learning_starts=5000", "experiment.seed=1",
              "evaluation.interval_iters=0", "evaluation.episodes=3"), needs=("mujoco",)),
    Scenario("driving_small", "embedded driving, the CI test's size", DRIVING,
             (*DRIVING_SMALL, "experiment.seed=2")),
    Scenario("driving_main", "embedded driving, the main config (84x84x4), 5k steps", DRIVING,
             ("experiment.stop_env_steps=5000", "evaluation.interval_iters=0", "evaluation.episodes=3",
              "experiment.seed=3")),
    Scenario("town_small", "embedded town, the CI test's size, 8k steps", TOWN,
             (*DRIVING_CI_SIZE, "evaluation.interval_iters=0", "evaluation.episodes=3",
              "experiment.stop_env_steps=8000", "experiment.seed=4")),
    Scenario("town_main", "embedded town, the shipped config (84x84x4), 5k steps", TOWN,
             ("experiment.stop_env_steps=5000", "evaluation.interval_iters=0", "evaluation.episodes=3",
              "experiment.seed=5")),
    Scenario("seed_replay", "the seed report's settings, rewards ~15 a step", DRIVING,
             (*DRIVING_SMALL, *SEED_SETTINGS, reward_weights(15.0)),
             expected=(*SEED_CAUSES, *COLLAPSE_RULES, "actor_saturated", "actor_dead", "gradient_explosion"), ci=True),
    Scenario("rewards_x100", "the seed's settings, rewards x100 and lr 1e-3", DRIVING,
             (*DRIVING_SMALL, *SEED_SETTINGS, reward_weights(100.0), "algo.actor_lr=1e-3", "algo.critic_lr=1e-3"),
             expected=(*SEED_CAUSES, *COLLAPSE_RULES, "actor_saturated", "actor_dead", "gradient_explosion",
                       "overestimation")),
    Scenario("lr_spike", "both learning rates x300 from step 3000", DRIVING, DRIVING_SMALL,
             expected=("q_out_of_bound", "q_growth", "gradient_explosion", "non_finite", *COLLAPSE_RULES,
                       "actor_saturated", "actor_dead", "gradients_vanished"),
             fault=lambda: learner_fault("lr_spike", 3000, factor=300.0), onset_step=3000),
    # Listed as a failure kind by the issue; measured, it is not one here: with the encoders (or
    # everything) unclipped at learning rates 1e-2, the policy learned to drive the full 200
    # steps (return ~150). The seed's clipping-off cases that do fail: seed_replay, rewards_x100.
    Scenario("encoder_clip_off", "encoders unclipped, learning rates 1e-2 (learns)", DRIVING,
             (*DRIVING_SMALL, "algo.critic_lr=1e-2", "algo.actor_lr=1e-2",
              "algo.grad_clip={actor.encoder: null, actor.head: 1.0, critic.encoder: null, critic.head: 10.0}")),
    Scenario("frozen_camera", "the camera sends black frames from step 2500", DRIVING, DRIVING_SMALL,
             expected=("observation_frozen",), fault=lambda: env_fault(frozen_camera, 2500), onset_step=2500,
             ci=True),
    Scenario("nan_observation", "NaN in the state vector from step 2500", DRIVING, DRIVING_SMALL,
             expected=("observation_non_finite", "non_finite", "training_error"), fault=lambda: env_fault(nan_state, 2500),
             onset_step=2500),
    Scenario("reward_sign_flip", "the reward's sign flips at step 3000", DRIVING, DRIVING_SMALL,
             expected=("reward_out_of_bounds",), fault=lambda: env_fault(flipped_reward, 3000), onset_step=3000,
             ci=True),
    Scenario("frozen_targets", "the Polyak update stops at step 2000", DRIVING, DRIVING_SMALL,
             expected=("targets_frozen",), fault=lambda: learner_fault("frozen_targets", 2000), onset_step=2000),
    Scenario("weights_stale", "the weights stop reaching the runners at step 3000", DRIVING, DRIVING_SMALL,
             expected=("weights_stale",), fault=lambda: data_path_fault("weights_stale", 3000), onset_step=3000),
    Scenario("replay_not_filling", "transitions stop reaching the learner's replay at step 3000", DRIVING,
             DRIVING_SMALL, expected=("replay_not_filling",), fault=lambda: data_path_fault("replay_not_filling", 3000),
             onset_step=3000),
    Scenario("learner_behind", "the learner makes half the updates owed from step 3000", DRIVING, DRIVING_SMALL,
             expected=("learner_behind",), fault=lambda: data_path_fault("learner_behind", 3000), onset_step=3000),
    Scenario("tiny_tau", "tau 1e-5: targets that barely move", "pendulum_td3.yaml",
             ("experiment.stop_env_steps=6000", "algo.tau=1e-5", "evaluation.interval_iters=0",
              "evaluation.episodes=3"), expected=("target_lag",)),
]


# --- Running and judging -------------------------------------------------------------------------


def onset_iteration(rows: list[dict], scenario: Scenario, learning_starts: int) -> int | None:
    """The first iteration in which the failure can be seen: its first step sampled, or the
    first iteration with learner updates."""
    step = scenario.onset_step if scenario.onset_step is not None else learning_starts + 1
    onset = next((r["iteration"] for r in rows if r.get("env/steps_sampled", 0) >= step), None)
    if onset is None and rows and rows[-1].get("env/steps_sampled", 0) + STEPS_PER_ITERATION >= step:
        onset = rows[-1]["iteration"] + 1  # the iteration the failure broke, unrecorded
    return onset


def judge(scenario: Scenario, run_dir: Path, learning_starts: int) -> dict:
    from rl.report import load_run, write_report

    _, rows, alerts, _ = load_run(run_dir)
    alerts = [a for a in alerts if a["level"] != "INFO"]
    passed_report, _ = write_report(run_dir)
    warns = sum(a["level"] == "WARN" for a in alerts)
    criticals = sum(a["level"] == "CRITICAL" for a in alerts)
    fired = [f"{a['level'][0]}:{a['rule']}@{a['iteration']}" for a in alerts]
    row = {
        "scenario": scenario.name,
        "what": scenario.what,
        "expected": "healthy" if scenario.healthy else " / ".join(scenario.expected),
        "fired": fired,
        "warn": warns,
        "critical": criticals,
        "iterations": len(rows),
        "report": "PASS" if passed_report else "FAIL",
    }
    if scenario.healthy:
        row["latency"] = None
        row["ok"] = criticals == 0 and warns <= 1 and passed_report
        return row
    onset = onset_iteration(rows, scenario, learning_starts)
    # Before onset, only a configuration check naming the cause of a failure present from the
    # start counts (its latency is negative); anything else then is not about this failure.
    caught = [
        a for a in alerts
        if a["rule"] in scenario.expected and onset is not None
        and (a["iteration"] >= onset or (scenario.onset_step is None and a["rule"] in CONFIG_RULES))
    ]
    critical = [a for a in alerts if a["level"] == "CRITICAL"]
    row["onset"] = onset
    row["latency"] = (caught[0]["iteration"] - onset) if caught and onset is not None else None
    row["critical_latency"] = (critical[0]["iteration"] - onset) if critical and onset is not None else None
    row["ok"] = row["latency"] is not None and row["latency"] <= MAX_LATENCY
    return row


def run_scenario(scenario: Scenario, out: Path, observe: bool = False) -> dict:
    from rl.train import train

    run_dir = out / scenario.name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    exp = load_config(
        CONFIGS / scenario.config,
        overrides=[*scenario.overrides, f"experiment.output_dir={out}", "wandb.enabled=false",
                   "experiment.checkpoint_every_iters=1000", *(["health.stop_on_critical=false"] if observe else [])],
    )
    start = time.monotonic()
    with scenario.fault() if scenario.fault else contextlib.nullcontext():
        train(exp, run_dir=run_dir, show_progress=False)
    row = judge(scenario, run_dir, exp.algo.learning_starts)
    row["wall_s"] = round(time.monotonic() - start)
    return row


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| scenario | what | expected | rules fired (W/C:rule@iteration) | onset | first expected alert | first CRITICAL | WARN | CRITICAL | report | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def delta(r, key):
        return "-" if r.get(key) is None else f"{r['onset'] + r[key]} ({r[key]:+d})"

    for r in rows:
        if r["expected"] == "healthy":
            verdict = "clean" if r["ok"] else "**FALSE ALARM**"
        else:
            verdict = "caught" if r["ok"] else "**MISSED**"
        lines.append(
            f"| {r['scenario']} | {r['what']} | {r['expected']} | {', '.join(r['fired']) or 'none'} | "
            f"{r.get('onset', '-')} | {delta(r, 'latency')} | {delta(r, 'critical_latency')} | "
            f"{r['warn']} | {r['critical']} | {r['report']} | {verdict} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.health_zoo", description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated scenario names")
    parser.add_argument("--ci", action="store_true", help="only the scenarios CI runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--observe", action="store_true",
        help="runs go to their end despite CRITICAL alerts (to see how a failure, or a dip, goes on)",
    )
    args = parser.parse_args(argv)
    chosen = [s for s in SCENARIOS if (not args.ci or s.ci) and (not args.only or s.name in args.only.split(","))]
    unknown = set((args.only or "").split(",")) - {s.name for s in SCENARIOS} - {""}
    if unknown:
        print(f"error: unknown scenario(s) {sorted(unknown)}; known: {[s.name for s in SCENARIOS]}", file=sys.stderr)
        return 2

    import importlib.util

    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for scenario in chosen:
            missing = [m for m in scenario.needs if importlib.util.find_spec(m) is None]
            if missing:
                print(f"skip {scenario.name}: needs {missing} (pip install -e .[bench])", flush=True)
                continue
            print(f"--- {scenario.name}: {scenario.what}", flush=True)
            row = run_scenario(scenario, args.out, args.observe)
            print(f"    {row}", flush=True)
            rows.append(row)
    finally:
        ray.shutdown()
    table = markdown_table(rows)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
