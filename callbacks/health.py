"""Training-health rules: each iteration's metrics in, `health/...` metrics and alerts out.

Every failure of the seed report has a rule here (thresholds: `health:` in the experiment YAML,
rl/config.py HealthSection):

| rule | level | fires when |
|---|---|---|
| non_finite | CRITICAL | a loss, a Q statistic or a weight is NaN or Inf |
| missing_metric | CRITICAL | a required metric (losses, Q) is not reported after learning started |
| q_out_of_bound | CRITICAL | Q leaves [r_min, r_max] / (1 - gamma) by more than `q_bound_slack` of that range |
| q_growth | WARN | max abs Q grew `q_growth_factor` times within a window and passed half the bound |
| overestimation | WARN | Q1(s0, a0) of finished episodes exceeds their discounted return by more than `overestimation_max` of the bound's range, over a window, and more than in the window before |
| clipping_broken | CRITICAL | a group's post-clip gradient norm is above its limit |
| return_collapse | WARN | the last window's mean return lost more than (1 - `collapse_fraction`) of its best window since learning started (see `window_collapse`) |
| episode_collapse | CRITICAL | the return collapsed and so did the episode length (shorter episodes with good returns are a policy reaching its goal sooner) |
| horizon, learning_rate, tau | WARN | at start: hyperparameters outside sane ranges for the env |

An alert fires once, when its condition starts; when the condition clears, an INFO alert says
so, and the rule can fire again. The monitor is plain Python: the RLlib callback (callbacks/health_callback.py) feeds it.
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


def above_clip_limit(post_clip_norm: float, limit: float | None) -> bool:
    """A post-clip norm above its limit (beyond float rounding): that clipping did not act."""
    return limit is not None and post_clip_norm > limit * (1 + 1e-3)


class HealthMonitor:
    def __init__(self, config: HealthSection, facts: RunFacts):
        self.config, self.facts = config, facts
        self._active: dict[str, int] = {}  # rule -> iteration its condition started
        self._iters_learning = 0
        self._since_learning: dict[str, list[float]] = {"episode/len_mean": [], "episode/return_mean": []}
        self._q_abs = deque(maxlen=config.window_iters)
        self._overestimation: list[float] = []  # relative to the bound's range

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
        alerts += [
            Alert(INFO, rule, f"{rule} no longer holds (it started at iteration {since}).", {}, iteration)
            for rule, since in self._active.items()
            if rule not in conditions
        ]
        self._active = {rule: self._active.get(rule, iteration) for rule in conditions}
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
        self._check_overestimation(m, span, health, conditions)
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

    def _check_overestimation(self, m: dict, span: float, health: dict, conditions: dict) -> None:
        """Windows of the iterations whose episodes ended (only they report it): the last
        window's mean above the limit and above the window before. A critic that starts
        optimistic (Q near 0, returns negative) comes down; a diverging one climbs."""
        if _finite(m.get("q/overestimation")):
            self._overestimation.append(m["q/overestimation"] / span)
            health["health/overestimation"] = self._overestimation[-1]
        w = self.config.window_iters
        if len(self._overestimation) < 2 * w:
            return
        recent = float(np.mean(self._overestimation[-w:]))
        before = float(np.mean(self._overestimation[-2 * w : -w]))
        if recent > self.config.overestimation_max and recent > before:
            conditions["overestimation"] = (
                WARN,
                f"the critic overestimates, more and more: at the starts of finished episodes Q1 "
                f"exceeded the discounted return they got by {recent:.2f} of the return range on "
                f"average over the last {w} such iterations ({before:.2f} the {w} before; allowed "
                f"{self.config.overestimation_max:g}); latest: Q1 "
                f"{m.get('q/start_estimate_mean', float('nan')):,.1f} against "
                f"{m.get('q/start_return_mean', float('nan')):,.1f}. Likely cause: the bias clipped "
                "double-Q should remove is coming back (target noise, tau, learning rates).",
                {"relative": recent, "relative_window_before": before},
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

    def _check_collapse(self, m: dict, health: dict, conditions: dict) -> None:
        if not self._iters_learning:  # the random warm-up is not the policy's own level
            return
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
        if lengths is not None and lengths[2]:
            conditions["episode_collapse"] = (
                CRITICAL,
                f"episodes collapsed: {text}, and episodes got short: {lengths[1]:.1f} steps against "
                f"{lengths[0]:.1f} at best. Likely cause: the policy learned to end episodes at "
                "once (crashing), typically after Q-values diverged.",
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
