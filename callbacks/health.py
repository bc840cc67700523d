"""Training-health rules: each iteration's metrics in, `health/...` metrics and alerts out.

The rules hold whatever the reward scale and whenever the failure starts: returns are judged
against what the run's own uniform warm-up got, gradient norms per unit of the run's observed
reward scale and against their own early level, overestimation against the returns actually
obtained. Thresholds: `health:` in the experiment YAML (rl/config.py HealthSection); the README's
"Training health" section says why each has its value. The failure zoo
(`python -m benchmarks.health_zoo`) is what they were calibrated and are judged on.

| rule | level | fires when |
|---|---|---|
| non_finite | CRITICAL | a loss, a Q statistic or a weight is NaN or Inf |
| missing_metric | CRITICAL | a required metric (losses, Q) is not reported in an iteration that made updates, after learning started |
| observation_non_finite | CRITICAL | an observation holds NaN or Inf |
| observation_frozen | CRITICAL | one observation part (e.g. the camera) held one value at every step, across resets, two judged iterations running |
| reward_out_of_bounds | CRITICAL | a reward outside the env's documented range was seen |
| q_out_of_bound | CRITICAL | Q leaves [r_min, r_max] / (1 - gamma) by more than `q_bound_slack` of that range; the rewards observed bound it when tighter than the documented ones |
| q_growth | WARN | max abs Q grew `q_growth_factor` times within a window and passed half the bound |
| overestimation | WARN | Q1(s0, a0) exceeds the discounted return of finished episodes by more than `overestimation_max` times those returns' size, and by half that more than in the window before |
| clipping_broken | CRITICAL | a group's post-clip gradient norm is above its limit |
| gradient_explosion | WARN | a group's pre-clip norm, per unit of reward scale, is `grad_limit_factor` x its reference limit, or `grad_growth_max` x its largest in the first `window_iters` learning iterations |
| gradients_vanished | CRITICAL | a group's pre-clip gradient norm was exactly 0 three iterations running: its parameters no longer learn |
| actor_saturated | WARN | more than `saturation_max` of the actor's outputs sit at the tanh bounds, over a window |
| actor_dead | CRITICAL | the actor is saturated and its gradients fell below `dead_grad_ratio` of their early level |
| targets_frozen | CRITICAL | learner updates ran but the target critic did not move at all |
| worse_than_warmup | CRITICAL (WARN) | since learning started, training returns and episode lengths clearly below the uniform warm-up's, not climbing, for `warmup_patience_iters` iterations; WARN when only returns are below |
| return_collapse | WARN | the last window's mean return lost more than (1 - `collapse_fraction`) of its best window since learning started |
| episode_collapse | CRITICAL | the return collapsed, so did the episode length, and returns are back to the warm-up's level or below |
| horizon, learning_rate, tau, target_lag | WARN | at start: hyperparameters outside sane ranges for the env and the run's length |
| horizon, reward_scale | WARN | at the end of the warm-up: the horizon against the episodes seen, the per-step reward scale |

An alert fires once, when its condition starts (and again if it escalates to CRITICAL); when the
condition has been absent `clear_iters` iterations running, an INFO alert says so, and the rule
can fire again. The monitor is plain Python: the RLlib callback
(callbacks/health_callback.py) feeds it live, and `rl.report` replays it over metrics.jsonl.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from rl.config import DEFAULT_GRAD_CLIP, HealthSection

INFO, WARN, CRITICAL = "INFO", "WARN", "CRITICAL"
Q_METRICS = ("q/q1_mean", "q/q2_mean", "q/q1_max", "q/q2_max", "q/q1_min", "q/q1_std", "q/q2_std")
LOSS_METRICS = ("losses/critic", "losses/actor")
ACTOR_GROUPS = ("actor.encoder", "actor.head")
FACTS_FILE = "run_facts.json"  # in the run directory: the RunFacts the live monitor used
TRAINING_ERROR = "training_error"  # the alert rl.train sends when training raised
INTERRUPTED = "interrupted"  # the alert rl.train sends when SIGINT or SIGTERM stopped it
HISTORY_LOST = "history_lost"  # rl.train: a run resumed without the metrics rows up to its checkpoint

# Rules that judge the configuration (at start, and at the end of the warm-up), not the run's
# course; `reward_scale` is the one meant to depend on the reward scale.
CONFIG_RULES = ("horizon", "learning_rate", "tau", "target_lag", "reward_scale")

# Every rule, with the check it stands for in the validation report (rl/report.py).
RULE_TITLES = {
    "non_finite": "no NaN or Inf in losses, Q values or weights",
    "sampling_stalled": "new env steps every iteration",
    "runner_silent": "every env runner delivering fragments",
    "weights_stale": "new weights reaching the env runners",
    "replay_not_filling": "new transitions reaching the learners' replay",
    "learner_behind": "the learners keeping the replay ratio",
    "missing_metric": "losses and Q reported every iteration since learning started",
    "observation_non_finite": "observations finite",
    "observation_frozen": "no observation part frozen (a dead sensor)",
    "reward_out_of_bounds": "rewards within the env's documented range",
    "q_out_of_bound": "Q within the discounted return bound",
    "q_growth": "Q not growing explosively",
    "overestimation": "overestimation not growing",
    "clipping_broken": "post-clip gradient norms within their limits",
    "gradient_explosion": "gradient norms bounded",
    "gradients_vanished": "no parameter group with vanished gradients",
    "actor_saturated": "actor not saturated at its bounds",
    "actor_dead": "actor still learning (not saturated with vanished gradients)",
    "targets_frozen": "target networks moving",
    "worse_than_warmup": "policy better than the uniform random warm-up",
    "return_collapse": "no return collapse",
    "episode_collapse": "no episode collapse",
    "horizon": "gamma's horizon fits the episodes",
    "learning_rate": "learning rates in range",
    "tau": "tau in range",
    "target_lag": "targets can move within the run",
    "reward_scale": "rewards near unit scale",
}


@dataclass(frozen=True)
class Alert:
    level: str
    rule: str
    message: str  # what is wrong, the evidence, the likely cause: one readable paragraph
    evidence: dict[str, float]
    iteration: int
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunFacts:
    """What the rules need to know about the run besides its metrics."""

    gamma: float
    grad_clip: dict[str, float | None]
    learning_starts: int
    actor_lr: float
    critic_lr: float
    tau: float
    reward_bounds: tuple[float, float] | None = None  # documented by the env, if it does
    max_episode_steps: int | None = None
    planned_updates: float | None = None  # learner updates the whole run will do
    updates_per_env_step: float | None = None  # the replay ratio the learners must keep

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunFacts":
        bounds = data.get("reward_bounds")
        return cls(**{**data, "reward_bounds": tuple(bounds) if bounds is not None else None})


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def above_clip_limit(post_clip_norm: float, limit: float | None) -> bool:
    """A post-clip norm above its limit (beyond float rounding): that clipping did not act."""
    return limit is not None and post_clip_norm > limit * (1 + 1e-3)


def means(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(mean return, mean length) of (count, mean return, mean length) rows, over episodes."""
    n, ret, length = (np.array(col, float) for col in zip(*rows))
    return float(np.average(ret, weights=n)), float(np.average(length, weights=n))


@dataclass
class _Episodes:
    """Training episodes that ended, per iteration: (count, mean return, mean length)."""

    rows: list[tuple[float, float, float]] = field(default_factory=list)

    def add(self, m: dict) -> None:
        count = m.get("episode/count", 0.0)
        if count and _finite(m.get("episode/return_mean")) and _finite(m.get("episode/len_mean")):
            self.rows.append((count, m["episode/return_mean"], m["episode/len_mean"]))

    @property
    def count(self) -> float:
        return sum(n for n, _, _ in self.rows)

    def summary(self) -> tuple[float, float, float, float] | None:
        """(mean return, per-episode return spread, mean length, per-episode length spread),
        weighted by episodes. The spreads come from the iteration means: n * (m_i - M)^2
        estimates one episode's variance."""
        if len(self.rows) < 2:
            return None
        n, ret, length = (np.array(col, float) for col in zip(*self.rows))
        mean_ret, mean_len = means(self.rows)
        spread_ret = math.sqrt(np.sum(n * (ret - mean_ret) ** 2) / (len(self.rows) - 1))
        spread_len = math.sqrt(np.sum(n * (length - mean_len) ** 2) / (len(self.rows) - 1))
        return mean_ret, spread_ret, mean_len, spread_len

    def recent(self, min_episodes: float, min_iterations: int, skip: int = 0):
        """The newest `min_episodes` episodes, over at least `min_iterations` iterations (leaving
        out the newest `skip` iterations); None when there are not that many. The oldest
        iteration counts only with the episodes still needed: after a burst of short episodes
        (a crash phase) the few long ones that follow are not drowned by it."""
        rows = self.rows[: len(self.rows) - skip]
        taken, episodes = [], 0.0
        for count, ret, length in reversed(rows):
            if len(taken) >= min_iterations and episodes + count > min_episodes:
                count = max(min_episodes - episodes, 0.0)
            if count:
                taken.append((count, ret, length))
                episodes += count
            if episodes >= min_episodes and len(taken) >= min_iterations:
                return taken[::-1]
        return None


class HealthMonitor:
    def __init__(self, config: HealthSection, facts: RunFacts):
        self.config, self.facts = config, facts
        # rule -> (iteration it started, highest level so far, iterations its condition is absent)
        self._active: dict[str, tuple[int, str, int]] = {}
        self._iters_learning = 0
        self._warmup, self._learning = _Episodes(), _Episodes()
        self._since_learning: dict[str, list[float]] = {"episode/len_mean": [], "episode/return_mean": []}
        self._q_abs = deque(maxlen=config.window_iters)
        self._overestimation: list[tuple[float, float]] = []  # (Q1(s0) - G0, |G0|)
        self._grad_norms: dict[str, list[float]] = {}  # group -> pre-clip norm per unit reward scale
        self._zero_grads: dict[str, int] = {}  # group -> iterations running its gradient was exactly 0
        self._saturation = deque(maxlen=config.window_iters)
        self._frozen_obs: dict[str, int] = {}  # part -> judged iterations running it was frozen
        self._below_warmup = 0  # consecutive judged iterations worse than the warm-up
        self._last_steps = 0.0  # env/steps_sampled of the previous iteration (none before the first)
        self._stalled = 0  # iterations running without a new env step
        # (env steps, learner updates, replay transitions added) of the last iterations, oldest
        # first: the data path's rules compare now with `stall_iters` iterations ago.
        self._data_path: deque[tuple[float, float, float]] = deque(maxlen=config.stall_iters + 1)

    # --- At start ---------------------------------------------------------------------------

    def start_checks(self) -> list[Alert]:
        f, alerts = self.facts, []
        if f.max_episode_steps:
            alerts += self._horizon_check(f.max_episode_steps, "last up to", 0)
        for name, lr in (("actor_lr", f.actor_lr), ("critic_lr", f.critic_lr)):
            if not 1e-6 <= lr <= 1e-2:
                alerts.append(Alert(
                    WARN, "learning_rate",
                    f"algo.{name}={lr:g} is outside [1e-6, 1e-2], where Adam-trained TD3 runs live. "
                    "Likely cause: a typo in the exponent.",
                    {name: lr}, 0,
                ))
        if f.tau > 0.1:
            alerts.append(Alert(
                WARN, "tau",
                f"algo.tau={f.tau:g}: targets that move this fast (> 0.1 per update) give up the "
                "stability they exist for; TD3 uses 0.005.",
                {"tau": f.tau}, 0,
            ))
        lag, ratio = 1.0 / f.tau, self.config.target_lag_ratio
        if f.planned_updates and lag * ratio > f.planned_updates:
            alerts.append(Alert(
                WARN, "target_lag",
                f"algo.tau={f.tau:g}: the target networks follow the critic with a lag of "
                f"{lag:,.0f} updates, but the whole run does {f.planned_updates:,.0f} updates "
                f"(fewer than {ratio:g} lags): the targets, and so Q, will barely have moved from "
                "their random start when the run ends. Likely cause: tau too small for this run's "
                "length (TD3 uses 0.005), or a run too short for it.",
                {"target_lag_updates": lag, "planned_updates": f.planned_updates}, 0,
            ))
        return alerts

    def _horizon_check(self, length: float, seen: str, iteration: int) -> list[Alert]:
        horizon, ratio = 1.0 / (1.0 - self.facts.gamma), self.config.horizon_ratio_max
        if horizon <= ratio * length and length <= ratio * horizon:
            return []
        return [Alert(
            WARN, "horizon",
            f"gamma={self.facts.gamma} gives an effective horizon of {horizon:.0f} steps, but "
            f"episodes {seen} {length:.0f} steps (more than {ratio:g}x apart). Likely cause: gamma "
            "chosen for another env; with a horizon much longer than the episodes, Q mostly "
            f"bootstraps on itself; much shorter, the policy cannot plan past {horizon:.0f} steps.",
            {"effective_horizon": horizon, "episode_steps": float(length)}, iteration,
        )]

    def _warmup_checks(self, m: dict, iteration: int) -> list[Alert]:
        """Once, when learning starts: what the uniform warm-up showed about the env."""
        alerts = []
        warm = self._warmup.summary()
        if warm is not None and not self.facts.max_episode_steps:
            # Without a time limit, the episodes seen are what gamma's horizon is measured
            # against (with one, the start check already did; no episode outlasts it).
            alerts += self._horizon_check(warm[2], "of the warm-up lasted", iteration)
        scale = m.get("replay/reward_abs_mean")
        if _finite(scale) and scale > self.config.reward_scale_max:
            alerts.append(Alert(
                WARN, "reward_scale",
                f"rewards average {scale:,.1f} in size per step during the warm-up (more than "
                f"{self.config.reward_scale_max:g}): TD targets, critic gradients and Q all grow "
                "with it, so gradient limits and learning rates tuned for rewards of about 1 act "
                "very differently here (clipping on every update, or steps far too large). "
                "Likely cause: reward terms weighted up; scale the rewards to about 1 per step.",
                {"reward_abs_mean": scale}, iteration,
            ))
        return alerts

    # --- Every iteration --------------------------------------------------------------------

    def update(self, iteration: int, metrics: dict[str, float]) -> tuple[dict[str, float], list[Alert]]:
        """This iteration's `health/...` metrics, and the alerts that start now."""
        health: dict[str, float] = {}
        conditions: dict[str, tuple[str, str, dict]] = {}  # rule -> (level, message, evidence)
        learning = metrics.get("env/steps_sampled", 0.0) > self.facts.learning_starts
        self._iters_learning += int(learning)
        (self._learning if learning else self._warmup).add(metrics)
        alerts = self._warmup_checks(metrics, iteration) if self._iters_learning == 1 and learning else []

        self._check_non_finite(metrics, conditions)
        self._check_sampling(metrics, conditions)
        self._check_data_path(metrics, conditions)
        # An iteration without updates (no fragment arrived in time) has no losses to report;
        # a learner that stops updating while steps arrive is `learner_behind`.
        if self._iters_learning > self.config.grace_iters and metrics.get("learner/updates") != 0:
            self._check_missing(metrics, conditions)
        self._check_observations(metrics, conditions)
        self._check_rewards(metrics, conditions)
        self._check_q(metrics, health, conditions)
        self._check_clipping(metrics, conditions)
        self._check_gradients(metrics, health, conditions)
        self._check_actor(metrics, conditions)
        self._check_targets(metrics, conditions)
        if self._iters_learning:  # the random warm-up is not the policy's own level
            self._check_warmup_baseline(metrics, health, conditions)
            self._check_collapse(metrics, health, conditions)

        # A rule alerts when its condition starts, and again if it escalates (WARN to CRITICAL).
        # It clears (an INFO alert) once its condition has been absent `clear_iters` iterations
        # running, so a condition flickering at its threshold does not alert over and over.
        for rule, (level, message, evidence) in conditions.items():
            since, was, _ = self._active.get(rule, (iteration, None, 0))
            if was is None or (level == CRITICAL and was != CRITICAL):
                alerts.append(Alert(level, rule, message, evidence, iteration))
            self._active[rule] = (since, level if was != CRITICAL else CRITICAL, 0)
        for rule, (since, level, absent) in list(self._active.items()):
            if rule in conditions:
                continue
            if absent + 1 >= self.config.clear_iters:
                alerts.append(Alert(INFO, rule, f"{rule} no longer holds (it started at iteration {since}).", {}, iteration))
                del self._active[rule]
            else:
                self._active[rule] = (since, level, absent + 1)
        health["health/alerts_active"] = float(len(conditions))
        health["health/critical"] = float(any(level == CRITICAL for level, _, _ in conditions.values()))
        return health, alerts

    def replay(self, rows: list[dict]) -> list[Alert]:
        """Runs the rules over recorded metrics rows (metrics.jsonl): the report's checklist,
        and a resumed run's monitor catching up on the run so far (its warm-up above all)."""
        return [alert for row in rows for alert in self.update(int(row["iteration"]), row)[1]]

    def _check_non_finite(self, m: dict, conditions: dict) -> None:
        bad = {k: m[k] for k in (*LOSS_METRICS, *Q_METRICS) if k in m and not math.isfinite(m[k])}
        if m.get("learner/non_finite_weights", 0.0) > 0:
            bad["learner/non_finite_weights"] = m["learner/non_finite_weights"]
        if bad:
            conditions["non_finite"] = (
                CRITICAL,
                f"NaN or Inf in {', '.join(sorted(bad))}. Training cannot recover from this: every "
                "later update inherits it. Likely cause: a diverging critic (check q/ and "
                "grad/ just before), a learning rate too high, or a NaN in the observations or rewards.",
                bad,
            )

    def _check_sampling(self, m: dict, conditions: dict) -> None:
        steps = m.get("env/steps_sampled", 0.0)  # absent until a first fragment arrived
        self._stalled = self._stalled + 1 if steps <= self._last_steps else 0
        self._last_steps = steps
        if self._stalled >= self.config.stall_iters:
            conditions["sampling_stalled"] = (
                WARN,
                f"no new env steps in the last {self._stalled} iterations (env/steps_sampled stays at "
                f"{steps:,.0f}): every env runner is down, being replaced or hung, and the learner has "
                "nothing new to learn from. Likely cause: a simulator that hangs or crashes over and "
                "over (CARLA: env/server_restarts, env/tick_timeouts; sampling/runner_restarts), "
                "runners that cannot be placed after a node was lost, or fragments that take longer "
                "than `resources.sample_timeout_s`.",
                {"env/steps_sampled": steps, "iterations": float(self._stalled)},
            )
            return
        silent_iters = m.get("sampling/runner_silent_iters")
        if silent_iters is not None and silent_iters >= self.config.stall_iters:
            silent_now = m.get("sampling/runners_silent", 1.0)
            conditions["runner_silent"] = (
                WARN,
                f"an env runner has delivered no fragment for {silent_iters:.0f} iterations while "
                f"sampling goes on without it ({silent_now:.0f} runner(s) delivered nothing this "
                "iteration): the run samples slower than it should, and a synchronous iteration "
                "waits `resources.sample_timeout_s` for it every time. Likely cause: its simulator "
                "hangs (CARLA: a server frozen without a tick timeout, env/tick_timeouts), its node "
                "is overloaded or lost, or it is being replaced (env runner restarts).",
                {"sampling/runner_silent_iters": silent_iters, "sampling/runners_silent": silent_now},
            )

    def _check_data_path(self, m: dict, conditions: dict) -> None:
        """Between sampling and learning (rl/td3/learner_replay.py): transitions must reach the
        learners' replay, the learners must make the updates owed, and their weights must reach
        the runners. Each failure leaves the run looking alive: steps grow, losses are logged."""
        if not {"env/steps_sampled", "replay/added", "learner/num_critic_updates"} <= m.keys():
            return
        self._data_path.append((m["env/steps_sampled"], m["learner/num_critic_updates"], m["replay/added"]))
        if len(self._data_path) <= self.config.stall_iters:
            return
        (steps0, updates0, added0), (steps, updates, added) = self._data_path[0], self._data_path[-1]
        n = self.config.stall_iters
        if steps > steps0 and (added - added0 < 0.5 * (steps - steps0)):
            conditions["replay_not_filling"] = (
                CRITICAL,
                f"{steps - steps0:,.0f} env steps were sampled in the last {n} iterations, but the "
                f"learners' replay took in {added - added0:,.0f} transitions (replay/added): the "
                "learners go on training on old data only. Likely cause: a learner restarted and "
                "lost its replay shard, or transitions dropped on their way to it.",
                {"env_steps": steps - steps0, "replay_added": added - added0},
            )
        learning0 = max(0.0, steps0 - self.facts.learning_starts)
        learning = max(0.0, steps - self.facts.learning_starts)
        ratio = self.facts.updates_per_env_step
        if ratio and learning0 > 0 and learning > learning0:
            kept = (updates - updates0) / (learning - learning0)
            if kept < 0.9 * ratio:
                conditions["learner_behind"] = (
                    WARN,
                    f"the learners made {updates - updates0:,.0f} updates for {learning - learning0:,.0f} "
                    f"new env steps in the last {n} iterations: {kept:.3f} per step, where "
                    f"algo.updates_per_env_step is {ratio:g}. The policy learns less from each step "
                    "than configured. Likely cause: a learner shard without data (several learners), "
                    "or learner calls that fail or return early.",
                    {"updates_per_env_step": kept, "configured": ratio},
                )
        missed = m.get("sampling/weights_missed_iters")
        if missed is not None and missed >= n:
            conditions["weights_stale"] = (
                WARN,
                f"an env runner was asked for a fragment holding weights that had been due for "
                f"replacement {missed:.0f} iterations (sampling/weights_missed_iters): new weights no "
                "longer reach it, and it samples with an old policy. Likely cause: weights that fail "
                "to load on the runner, or a publishing step that stopped (perf/weight_sync_s).",
                {"sampling/weights_missed_iters": missed, "sampling/policy_lag_max": m.get("sampling/policy_lag_max", math.nan)},
            )

    def _check_missing(self, m: dict, conditions: dict) -> None:
        missing = [k for k in self.config.required_metrics if k not in m]
        if missing:
            conditions["missing_metric"] = (
                CRITICAL,
                f"required metrics not reported although learning started "
                f"{self._iters_learning} iterations ago: {', '.join(missing)}. Without them a "
                "diverging run looks healthy. Likely cause: the learner does not log them "
                "(renamed or removed metric), or no update ran.",
                {k: float("nan") for k in missing},
            )

    def _check_observations(self, m: dict, conditions: dict) -> None:
        if m.get("obs/non_finite", 0.0) > 0:
            conditions["observation_non_finite"] = (
                CRITICAL,
                f"{m['obs/non_finite']:,.0f} NaN or Inf values in this iteration's observations. "
                "They reach the replay buffer and, through the networks, every weight. Likely "
                "cause: a sensor or measurement that failed (division by zero, a lost reading).",
                {"obs/non_finite": m["obs/non_finite"]},
            )
        frozen = []
        for key, value in m.items():
            if key.startswith("obs/") and key.endswith("/frozen") and _finite(value):
                part = key[len("obs/") : -len("/frozen")]
                self._frozen_obs[part] = self._frozen_obs.get(part, 0) + 1 if value == 1.0 else 0
                if self._frozen_obs[part] >= 2:
                    frozen.append(part)
        if frozen:
            conditions["observation_frozen"] = (
                CRITICAL,
                f"the observation's {', '.join(f'`{p}`' for p in frozen)} held one single value "
                f"at every step, across episode resets, for {max(self._frozen_obs[p] for p in frozen)} "
                "iterations running: the policy is blind to what it should show. Likely cause: a "
                "dead sensor (a camera sending black or stale frames), or an env that stopped "
                "updating it.",
                {f"{p}/frozen_iterations": float(self._frozen_obs[p]) for p in frozen},
            )

    def _check_rewards(self, m: dict, conditions: dict) -> None:
        bounds, low, high = self.facts.reward_bounds, m.get("replay/reward_min"), m.get("replay/reward_max")
        if bounds is None or not (_finite(low) and _finite(high)):
            return
        tolerance = 1e-3 * max(bounds[1] - bounds[0], 1e-6)
        if low < bounds[0] - tolerance or high > bounds[1] + tolerance:
            conditions["reward_out_of_bounds"] = (
                CRITICAL,
                f"rewards in [{low:g}, {high:g}] were seen, outside the env's documented range "
                f"[{bounds[0]:g}, {bounds[1]:g}]: the Q bound and every scale the rules use are "
                "wrong, and the agent may be paid for something else than intended. Likely cause: "
                "a reward term that changed sign or weight, or `env.reward_bounds` out of date.",
                {"reward_min": low, "reward_max": high, "documented_min": bounds[0], "documented_max": bounds[1]},
            )

    def _q_bound(self, m: dict) -> tuple[float, float] | None:
        """[r_min, r_max] / (1 - gamma): the documented reward range, narrowed to the rewards
        observed (Q is trained only on those, so it cannot rightly leave their bound)."""
        bounds = self.facts.reward_bounds
        if _finite(m.get("replay/reward_min")) and _finite(m.get("replay/reward_max")):
            observed = (m["replay/reward_min"], m["replay/reward_max"])
            bounds = observed if bounds is None else (max(bounds[0], observed[0]), min(bounds[1], observed[1]))
            if bounds[0] > bounds[1]:  # observed entirely outside the documented range
                bounds = self.facts.reward_bounds
        if bounds is None:
            return None
        scale = 1.0 / (1.0 - self.facts.gamma)
        return bounds[0] * scale, bounds[1] * scale

    def _check_q(self, m: dict, health: dict, conditions: dict) -> None:
        q_hi = max((m[k] for k in ("q/q1_max", "q/q2_max") if _finite(m.get(k))), default=None)
        q_lo = m.get("q/q1_min")
        bound = self._q_bound(m)
        if q_hi is None or bound is None:
            return
        lower, upper = bound
        span = max(upper - lower, 1e-6)
        below = (lower - q_lo) if _finite(q_lo) else 0.0
        excess = max(q_hi - upper, below, 0.0) / span
        health.update({"health/q_bound_lower": lower, "health/q_bound_upper": upper, "health/q_excess": excess})
        if excess > self.config.q_bound_slack:
            conditions["q_out_of_bound"] = (
                CRITICAL,
                f"Q values left the range any return can have: Q max {q_hi:,.1f}, Q min "
                f"{f'{q_lo:,.1f}' if _finite(q_lo) else 'not logged'}, but rewards in [{lower * (1 - self.facts.gamma):g}, "
                f"{upper * (1 - self.facts.gamma):g}] with gamma {self.facts.gamma} bound every "
                f"discounted return to [{lower:,.1f}, {upper:,.1f}] (off by {excess:.1f}x that "
                "range). Likely cause: overestimation feeding on itself through the targets "
                "(learning rate, tau, or clipping too loose), or rewards larger than documented.",
                {"q_max": q_hi, "q_min": q_lo if _finite(q_lo) else None, "bound_lower": lower, "bound_upper": upper, "excess": excess},
            )
        self._check_overestimation(m, health, conditions)
        self._q_abs.append(abs(q_hi))
        first, now = self._q_abs[0], self._q_abs[-1]
        # Half the bound on the side Q is on; at least a tenth of the range (a bound at 0).
        half_bound = max(0.5 * abs(upper if q_hi >= 0 else lower), 0.1 * span)
        grew = first > 1e-3 and now >= self.config.q_growth_factor * first
        if len(self._q_abs) == self._q_abs.maxlen and grew and now > half_bound:
            conditions["q_growth"] = (
                WARN,
                f"max |Q| grew {now / first:.0f}x in {len(self._q_abs)} iterations (from "
                f"{first:,.1f} to {now:,.1f}) and is past half the return bound ({half_bound:,.1f}). "
                "Likely cause: the start of a divergence; watch q/ and the learning rates.",
                {"q_abs_start": first, "q_abs_now": now, "half_bound": half_bound},
            )

    def _check_overestimation(self, m: dict, health: dict, conditions: dict) -> None:
        """Windows of the iterations whose episodes ended (only they report it), relative to
        the size of the returns those episodes got: the last window above the limit and above
        the window before. A critic that starts optimistic (Q near 0, returns negative) comes
        down; a diverging one climbs."""
        if _finite(m.get("q/overestimation")) and _finite(m.get("q/start_return_mean")):
            self._overestimation.append((m["q/overestimation"], abs(m["q/start_return_mean"])))
        w = self.config.window_iters
        if len(self._overestimation) < 2 * w:
            return
        over, size = (np.array(col) for col in zip(*self._overestimation[-2 * w :]))
        scale = max(float(size.mean()), float(np.abs(over).mean()) * 1e-3, 1e-9)
        recent, before = float(over[w:].mean()) / scale, float(over[:w].mean()) / scale
        health["health/overestimation"] = recent
        limit = self.config.overestimation_max
        if recent > limit and recent > before + limit / 2:
            conditions["overestimation"] = (
                WARN,
                f"the critic overestimates, more and more: at the starts of finished episodes Q1 "
                f"exceeded the discounted return they got by {recent:.2f} times the size of those "
                f"returns ({scale:,.1f}) on average over the last {w} such iterations ({before:.2f} "
                f"the {w} before; allowed {limit:g}, and a rise of {limit / 2:g}); latest: Q1 "
                f"{m.get('q/start_estimate_mean', float('nan')):,.1f} against "
                f"{m.get('q/start_return_mean', float('nan')):,.1f}. Likely cause: the bias clipped "
                "double-Q should remove is coming back (target noise, tau, learning rates).",
                {"relative": recent, "relative_window_before": before, "return_scale": scale},
            )

    def _check_clipping(self, m: dict, conditions: dict) -> None:
        broken = {}
        for group, limit in self.facts.grad_clip.items():
            post = m.get(f"grad/{group}/post_clip_norm")
            if _finite(post) and above_clip_limit(post, limit):
                broken[group] = (post, limit)
        if broken:
            text = "; ".join(f"{g}: {post:.3g} > limit {limit:g}" for g, (post, limit) in broken.items())
            conditions["clipping_broken"] = (
                CRITICAL,
                f"gradient norms after clipping are above their limits ({text}): clipping is not "
                "being applied to these parameters. Likely cause: parameters missing from their "
                "clipping group, or clipping done after the optimizer step.",
                {f"{g}/post_clip_norm": post for g, (post, _) in broken.items()},
            )

    def reference_limit(self, group: str) -> float:
        """The gradient norm a group is expected to stay near, for rewards of about 1 a step:
        `health.grad_reference`, else the group's clip limit, else the module-wise default."""
        return (
            self.config.grad_reference.get(group)
            or self.facts.grad_clip.get(group)
            or DEFAULT_GRAD_CLIP[group]
        )

    def _check_gradients(self, m: dict, health: dict, conditions: dict) -> None:
        """Pre-clip norms, also when clipping is off: exactly 0 (a dead network), and per unit of
        the observed reward scale (TD errors, and so both networks' gradients, grow in proportion
        to the rewards) against a reference and against their own early level."""
        pre_clip = {g: m[f"grad/{g}/pre_clip_norm"] for g in DEFAULT_GRAD_CLIP if _finite(m.get(f"grad/{g}/pre_clip_norm"))}
        for group, pre in pre_clip.items():
            self._zero_grads[group] = self._zero_grads.get(group, 0) + 1 if pre == 0.0 else 0
        vanished = sorted(g for g, n in self._zero_grads.items() if n >= 3)
        if vanished:
            conditions["gradients_vanished"] = (
                CRITICAL,
                f"the gradients of {', '.join(vanished)} have been exactly 0 for "
                f"{max(self._zero_grads[g] for g in vanished)} iterations: those parameters no "
                "longer learn, and nothing in TD3 revives them. Likely cause: dead ReLUs or a "
                "saturated tanh after a step far too large (a learning-rate spike, an exploding "
                "critic).",
                {f"{g}/zero_grad_iterations": float(self._zero_grads[g]) for g in vanished},
            )
        scale = m.get("replay/reward_abs_mean")
        if not _finite(scale) or scale <= 0:
            return
        w, exploding = self.config.window_iters, {}
        for group, pre in pre_clip.items():
            norms = self._grad_norms.setdefault(group, [])
            norms.append(pre / scale)
            recent = float(np.median(norms[-3:]))
            early = max(norms[:w])  # the largest, not typical: an early dead phase is not the norm
            limit = self.reference_limit(group) * self.config.grad_limit_factor
            health[f"health/grad_{group}"] = recent
            if len(norms) >= 3 and (recent > limit or (len(norms) > w and recent > self.config.grad_growth_max * early)):
                exploding[group] = (recent, early, limit)
        if exploding:
            text = "; ".join(
                f"{g}: {r:,.3g} per unit of reward (early {e:,.3g}, limit {lim:,.3g})" for g, (r, e, lim) in exploding.items()
            )
            conditions["gradient_explosion"] = (
                WARN,
                f"gradient norms before clipping exploded ({text}; rewards average {scale:,.3g} a "
                "step): updates this large tear the features apart, and a clip limit only hides "
                "it. Likely cause: a learning rate too high, encoder clipping off, or rewards far "
                "from unit scale.",
                {f"{g}/pre_clip_per_reward": r for g, (r, _, _) in exploding.items()},
            )

    def _check_actor(self, m: dict, conditions: dict) -> None:
        if _finite(m.get("learner/actor_saturation")):
            self._saturation.append(m["learner/actor_saturation"])
        if len(self._saturation) < self._saturation.maxlen:
            return
        saturation = float(np.mean(self._saturation))
        if saturation <= self.config.saturation_max:
            return
        evidence = {"saturation": saturation}
        dead = []
        for group in ACTOR_GROUPS:
            norms = self._grad_norms.get(group, [])
            w = self.config.window_iters
            if len(norms) > w:
                early, recent = float(np.median(norms[:w])), float(np.median(norms[-w:]))
                evidence[f"{group}/grad_vs_early"] = recent / max(early, 1e-12)
                if recent < self.config.dead_grad_ratio * early:
                    dead.append(f"{group} {recent / max(early, 1e-12):.1e}")
        text = (
            f"{saturation:.0%} of the actor's action components sat at the tanh bounds (abs(a) > "
            f"0.99) over the last {len(self._saturation)} iterations"
        )
        if dead:
            conditions["actor_dead"] = (
                CRITICAL,
                f"the actor is dead: {text}, and its gradients fell to a fraction of their early "
                f"level ({', '.join(dead)}): tanh passes nothing back, so it cannot learn its way "
                "out. Likely cause: a critic whose gradients in the action point far outside the "
                "bounds (diverging Q, rewards far from unit scale, an actor learning rate too high).",
                evidence,
            )
        else:
            conditions["actor_saturated"] = (
                WARN,
                f"{text}. A saturated tanh learns slowly and acts bang-bang. Likely cause: Q "
                "growing without bound in the action, or an actor learning rate too high.",
                evidence,
            )

    def _check_targets(self, m: dict, conditions: dict) -> None:
        change = m.get("learner/target_change")
        if _finite(change) and change == 0.0:
            conditions["targets_frozen"] = (
                CRITICAL,
                "the target critic did not move at all during this iteration's updates: the "
                "targets, and so what Q learns toward, stay where they started. Likely cause: "
                "the Polyak update is not being applied, or tau so small it rounds to nothing.",
                {"target_change": change},
            )

    def _check_warmup_baseline(self, m: dict, health: dict, conditions: dict) -> None:
        """Since learning started, training episodes clearly worse than the uniform random
        warm-up's, and not getting better, for `warmup_patience_iters` iterations: a policy
        collapsed from its first updates never had a "best" to fall from, so this rule judges
        it against random play. The patience is for the dip of a healthy run: a fresh policy
        often crashes sooner than random play for several iterations (measured: 7 and 9 in
        the driving zoo's healthy runs), then climbs out of it."""
        c = self.config
        warm = self._warmup.summary()
        recent = self._learning.recent(c.min_window_episodes, c.min_window_iters)
        if warm is None or recent is None or self._warmup.count < c.min_window_episodes:
            return
        warm_ret, warm_ret_spread, warm_len, warm_len_spread = warm
        now_ret, now_len = means(recent)
        margin = c.warmup_margin * max(warm_ret_spread, 1e-6)
        health["health/return_vs_warmup"] = (now_ret - warm_ret) / max(warm_ret_spread, 1e-6)
        if m.get("episode/count", 0.0):  # judged again only when new episodes ended
            before = self._learning.recent(c.min_window_episodes, c.min_window_iters, skip=len(recent))
            climbing = before is not None and now_ret > means(before)[0] + margin
            below = now_ret < warm_ret - margin and not climbing
            self._below_warmup = self._below_warmup + 1 if below else 0
        health["health/below_warmup_iters"] = float(self._below_warmup)
        if self._below_warmup < c.warmup_patience_iters:
            return
        len_margin = c.warmup_margin * max(warm_len_spread, 1e-6)
        shorter, longer = now_len < warm_len - len_margin, now_len > warm_len + len_margin
        if longer:  # lasting longer for less: reward shaping to look at, not a collapse
            return
        evidence = {"return_recent": now_ret, "return_warmup": warm_ret, "len_recent": now_len, "len_warmup": warm_len}
        text = (
            f"for {self._below_warmup} iterations, training episodes have returned less than the "
            f"uniform random warm-up's, without climbing: {now_ret:,.2f} on average (the last "
            f"{sum(r[0] for r in recent):.0f} episodes) against {warm_ret:,.2f} (spread {warm_ret_spread:,.2f} per "
            f"episode), lasting {now_len:.1f} steps against {warm_len:.1f}"
        )
        if shorter:
            conditions["worse_than_warmup"] = (
                CRITICAL,
                f"the policy is worse than random: {text}. Likely cause: the actor collapsed onto "
                "actions that end episodes at once (crashing), from a critic that diverged or "
                "saturated the actor in its first updates (learning rates, tau, clipping, reward "
                "scale: see the other alerts).",
                evidence,
            )
        else:
            conditions["worse_than_warmup"] = (
                WARN,
                f"the policy earns less than random play: {text}. Likely cause: the policy is "
                "learning the wrong thing (reward shaping, a critic far off).",
                evidence,
            )

    def _check_collapse(self, m: dict, health: dict, conditions: dict) -> None:
        collapse = {}
        for key in ("episode/len_mean", "episode/return_mean"):
            if _finite(m.get(key)):
                self._since_learning[key].append(m[key])
            collapse[key] = window_collapse(self._since_learning[key], self.config.window_iters, self.config.collapse_fraction)
            if collapse[key] is not None:
                health[f"health/{key.split('/')[1]}_vs_best"] = collapse[key][1] - collapse[key][0]
        returns, lengths = collapse["episode/return_mean"], collapse["episode/len_mean"]
        if returns is None or not returns[2]:
            return  # shorter episodes with good returns are a policy reaching its goal sooner
        window = self.config.window_iters
        evidence = {"return_recent": returns[1], "return_best": returns[0]}
        text = (
            f"mean return fell to {returns[1]:,.2f} over the last {window} iterations from "
            f"{returns[0]:,.2f} at its best since learning started (lost more than "
            f"{1 - self.config.collapse_fraction:.0%} of it)"
        )
        warm = self._warmup.summary()
        back_to_random = warm is None or returns[1] <= warm[0]
        if lengths is not None and lengths[2] and back_to_random:
            conditions["episode_collapse"] = (
                CRITICAL,
                f"episodes collapsed: {text}, and episodes got short: {lengths[1]:.1f} steps against "
                f"{lengths[0]:.1f} at best, back to no better than the random warm-up"
                + (f" ({warm[0]:,.2f})" if warm else "")
                + ". Likely cause: the policy learned to end episodes at once (crashing), "
                "typically after Q-values diverged.",
                {**evidence, "len_recent": lengths[1], "len_best": lengths[0]},
            )
        else:
            conditions["return_collapse"] = (
                WARN,
                f"{text}. Likely cause: the policy is unlearning; check Q against its bound and "
                "how episodes end.",
                evidence,
            )


def window_collapse(values: list[float], window: int, fraction: float) -> tuple[float, float, bool] | None:
    """(best window mean, last window mean, collapsed). Collapsed: the last window lost more
    than (1 - fraction) of the best one, measured against max(best - first window, abs(best)),
    i.e. of what learning gained or of the level itself. None: too few values."""
    if len(values) < window:
        return None
    means = np.convolve(values, np.ones(window) / window, mode="valid")
    best, recent = float(means.max()), float(means[-1])
    scale = max(best - float(means[0]), abs(best), 1e-6)
    return best, recent, best - recent > (1 - fraction) * scale
