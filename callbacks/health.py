"""Training-health rules: each iteration's metrics in, `health/...` metrics and alerts out.

Every failure of the seed report has a rule here (thresholds: `health:` in the experiment YAML,
rl/config.py HealthSection):

| rule | level | fires when |
|---|---|---|
| non_finite | CRITICAL | a loss, a Q statistic or a weight is NaN or Inf |
| missing_metric | CRITICAL | a required metric (losses, Q) is not reported after learning started |
| q_out_of_bound | CRITICAL | Q leaves [r_min, r_max] / (1 - gamma) by more than `q_bound_slack` of that range |
| q_growth | WARN | max abs Q grew `q_growth_factor` times within a window and passed half the bound |
| clipping_broken | CRITICAL | a group's post-clip gradient norm is above its limit |
| episode_length_collapse | CRITICAL | recent mean episode length < `collapse_fraction` x the run's first window |
| return_collapse | WARN | recent mean return fell by more than (1 - `collapse_fraction`) x abs(first window's) |
| horizon, learning_rate, tau | WARN | at start: hyperparameters outside sane ranges for the env |

An alert fires once, when its condition starts; it can fire again only after the condition has
cleared. The monitor is plain Python: the RLlib callback (callbacks/health_callback.py) feeds it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from rl.config import HealthSection

INFO, WARN, CRITICAL = "INFO", "WARN", "CRITICAL"
Q_METRICS = ("q/q1_mean", "q/q2_mean", "q/q1_max", "q/q2_max", "q/q1_min", "q/q1_std", "q/q2_std")
LOSS_METRICS = ("losses/critic", "losses/actor")


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


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


class HealthMonitor:
    def __init__(self, config: HealthSection, facts: RunFacts):
        self.config, self.facts = config, facts
        self._active: set[str] = set()
        self._iters_learning = 0
        self._early: dict[str, list[float]] = {"episode/len_mean": [], "episode/return_mean": []}
        self._recent = {k: deque(maxlen=config.window_iters) for k in self._early}
        self._q_abs = deque(maxlen=config.window_iters)

    # --- At start ---------------------------------------------------------------------------

    def start_checks(self) -> list[Alert]:
        f, alerts = self.facts, []
        horizon = 1.0 / (1.0 - f.gamma)
        ratio = self.config.horizon_ratio_max
        if f.max_episode_steps:
            length = f.max_episode_steps
            if horizon > ratio * length or length > ratio * horizon:
                alerts.append(Alert(
                    WARN, "horizon",
                    f"gamma={f.gamma} gives an effective horizon of {horizon:.0f} steps, but episodes "
                    f"last up to {length} steps (more than {ratio:g}x apart). Likely cause: gamma "
                    f"chosen for another env; with a horizon much longer than the episode, Q mostly "
                    f"bootstraps on itself; much shorter, the policy cannot plan past {horizon:.0f} steps.",
                    {"effective_horizon": horizon, "max_episode_steps": float(length)}, 0,
                ))
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
        return alerts

    # --- Every iteration --------------------------------------------------------------------

    def update(self, iteration: int, metrics: dict[str, float]) -> tuple[dict[str, float], list[Alert]]:
        """This iteration's `health/...` metrics, and the alerts that start now."""
        health: dict[str, float] = {}
        conditions: dict[str, tuple[str, str, dict]] = {}  # rule -> (level, message, evidence)
        learning = metrics.get("env/steps_sampled", 0.0) > self.facts.learning_starts
        self._iters_learning += int(learning)

        self._check_non_finite(metrics, conditions)
        if self._iters_learning > self.config.grace_iters:
            self._check_missing(metrics, conditions)
        self._check_q(metrics, health, conditions)
        self._check_clipping(metrics, conditions)
        self._check_collapse(metrics, health, conditions)

        alerts = [
            Alert(level, rule, message, evidence, iteration)
            for rule, (level, message, evidence) in conditions.items()
            if rule not in self._active
        ]
        self._active = set(conditions)
        health["health/alerts_active"] = float(len(conditions))
        health["health/critical"] = float(any(level == CRITICAL for level, _, _ in conditions.values()))
        return health, alerts

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

    def _q_bound(self, m: dict) -> tuple[float, float] | None:
        bounds = self.facts.reward_bounds
        if bounds is None and _finite(m.get("replay/reward_min")) and _finite(m.get("replay/reward_max")):
            bounds = (m["replay/reward_min"], m["replay/reward_max"])
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
        span = max(upper - lower, 1.0)
        below = (lower - q_lo) if _finite(q_lo) else 0.0
        excess = max(q_hi - upper, below, 0.0) / span
        health.update({"health/q_bound_lower": lower, "health/q_bound_upper": upper, "health/q_excess": excess})
        if excess > self.config.q_bound_slack:
            conditions["q_out_of_bound"] = (
                CRITICAL,
                f"Q values left the range any return can have: Q max {q_hi:,.1f}, Q min "
                f"{q_lo:,.1f}, but rewards in [{lower * (1 - self.facts.gamma):g}, "
                f"{upper * (1 - self.facts.gamma):g}] with gamma {self.facts.gamma} bound every "
                f"discounted return to [{lower:,.1f}, {upper:,.1f}] (off by {excess:.1f}x that "
                "range). Likely cause: overestimation feeding on itself through the targets "
                "(learning rate, tau, or clipping too loose), or rewards larger than documented.",
                {"q_max": q_hi, "q_min": q_lo, "bound_lower": lower, "bound_upper": upper, "excess": excess},
            )
        self._q_abs.append(abs(q_hi))
        first, now = self._q_abs[0], self._q_abs[-1]
        half_bound = 0.5 * abs(upper if q_hi >= 0 else lower)  # the side Q is on
        grew = first > 1e-3 and now >= self.config.q_growth_factor * first
        if len(self._q_abs) == self._q_abs.maxlen and grew and now > half_bound:
            conditions["q_growth"] = (
                WARN,
                f"max |Q| grew {now / first:.0f}x in {len(self._q_abs)} iterations (from "
                f"{first:,.1f} to {now:,.1f}) and is past half the return bound ({half_bound:,.1f}). "
                "Likely cause: the start of a divergence; watch q/ and the learning rates.",
                {"q_abs_start": first, "q_abs_now": now, "half_bound": half_bound},
            )

    def _check_clipping(self, m: dict, conditions: dict) -> None:
        broken = {}
        for group, limit in self.facts.grad_clip.items():
            post = m.get(f"grad/{group}/post_clip_norm")
            if limit is not None and _finite(post) and post > limit * (1 + 1e-3):
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

    def _check_collapse(self, m: dict, health: dict, conditions: dict) -> None:
        window, fraction = self.config.window_iters, self.config.collapse_fraction
        for key in self._early:
            if not _finite(m.get(key)):
                continue
            if len(self._early[key]) < window:
                self._early[key].append(m[key])
            self._recent[key].append(m[key])
        ready = {k: len(self._early[k]) == window and len(self._recent[k]) == window for k in self._early}
        if ready["episode/len_mean"]:
            early, recent = np.mean(self._early["episode/len_mean"]), np.mean(self._recent["episode/len_mean"])
            health["health/len_vs_early"] = recent / early
            if recent < fraction * early:
                conditions["episode_length_collapse"] = (
                    CRITICAL,
                    f"episodes collapsed: mean length {recent:.1f} steps over the last {window} "
                    f"iterations, against {early:.1f} in the run's first {window} (below "
                    f"{fraction:.0%}). Likely cause: the policy learned to end episodes early "
                    "(crashing at once), often after Q-values diverged.",
                    {"len_recent": recent, "len_early": early},
                )
        if ready["episode/return_mean"]:
            early, recent = np.mean(self._early["episode/return_mean"]), np.mean(self._recent["episode/return_mean"])
            drop = early - recent
            health["health/return_drop"] = drop
            if drop > (1 - fraction) * max(abs(early), 1e-6):
                conditions["return_collapse"] = (
                    WARN,
                    f"returns fell: mean {recent:,.2f} over the last {window} iterations against "
                    f"{early:,.2f} in the run's first {window}. Likely cause: the policy is "
                    "unlearning (check Q against its bound and the episode ends).",
                    {"return_recent": recent, "return_early": early},
                )
