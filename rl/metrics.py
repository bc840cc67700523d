"""Stable metric names: what an RLlib result dict means, flattened for logs, files and dashboards.

RLlib's nested result keys change between releases; ours do not. Everything downstream
(metrics.jsonl, the console, W&B, health rules, reports) reads these names only.
"""

from __future__ import annotations

import math
from typing import Any

from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.utils import metrics as M

from rl.td3 import td3_learner as L
from rl.td3.td3 import (
    ITERATION_UPDATES,
    LEARNER_INPUT_BYTES,
    LEARNER_WAIT_TIMER,
    OVERESTIMATION,
    POLICY_LAG_MAX,
    POLICY_LAG_MEAN,
    REPLAY_ADDED,
    REPLAY_BUFFER_SIZE,
    REPLAY_BYTES_PER_TRANSITION,
    REPLAY_REWARD_ABS_MEAN,
    REPLAY_REWARD_MAX,
    REPLAY_REWARD_MIN,
    REPLAY_RATIO,
    RUNNER_SILENT_ITERS,
    RUNNERS_SILENT,
    START_Q_MEAN,
    START_RETURN_MEAN,
    WEIGHTS_MISSED_ITERS,
)

# stable name -> path in the RLlib result dict
RESULT_PATHS: dict[str, tuple[str, ...]] = {
    "episode/return_mean": ("env_runners", "episode_return_mean"),
    "episode/len_mean": ("env_runners", "episode_len_mean"),
    "episode/count": ("env_runners", "num_episodes"),
    "eval/return_mean": ("evaluation", "env_runners", "episode_return_mean"),
    "eval/len_mean": ("evaluation", "env_runners", "episode_len_mean"),
    "losses/critic": ("learners", DEFAULT_MODULE_ID, L.CRITIC_LOSS),
    "losses/actor": ("learners", DEFAULT_MODULE_ID, L.ACTOR_LOSS),
    "q/q1_mean": ("learners", DEFAULT_MODULE_ID, L.Q1_MEAN),
    "q/q2_mean": ("learners", DEFAULT_MODULE_ID, L.Q2_MEAN),
    "q/q1_max": ("learners", DEFAULT_MODULE_ID, L.Q1_MAX),
    "q/q2_max": ("learners", DEFAULT_MODULE_ID, L.Q2_MAX),
    "q/q1_min": ("learners", DEFAULT_MODULE_ID, L.Q1_MIN),
    "q/q1_std": ("learners", DEFAULT_MODULE_ID, L.Q1_STD),
    "q/q2_std": ("learners", DEFAULT_MODULE_ID, L.Q2_STD),
    "q/start_estimate_mean": (START_Q_MEAN,),
    "q/start_return_mean": (START_RETURN_MEAN,),
    "q/overestimation": (OVERESTIMATION,),
    "learner/non_finite_weights": ("learners", DEFAULT_MODULE_ID, L.NON_FINITE_WEIGHTS),
    "learner/actor_saturation": ("learners", DEFAULT_MODULE_ID, L.ACTOR_SATURATION),
    "learner/target_change": ("learners", DEFAULT_MODULE_ID, L.TARGET_CHANGE),
    "q/target_mean": ("learners", DEFAULT_MODULE_ID, L.Q_TARGET_MEAN),
    "q/td_error_mean": ("learners", DEFAULT_MODULE_ID, L.TD_ERROR_MEAN),
    "learner/num_critic_updates": ("learners", DEFAULT_MODULE_ID, L.NUM_CRITIC_UPDATES),
    "learner/num_actor_updates": ("learners", DEFAULT_MODULE_ID, L.NUM_ACTOR_UPDATES),
    "learner/updates": (ITERATION_UPDATES,),  # this iteration's
    "env/steps_sampled": (M.ENV_RUNNER_RESULTS, M.NUM_ENV_STEPS_SAMPLED_LIFETIME),
    "replay/size": (REPLAY_BUFFER_SIZE,),
    "replay/reward_min": (REPLAY_REWARD_MIN,),
    "replay/reward_max": (REPLAY_REWARD_MAX,),
    "replay/reward_abs_mean": (REPLAY_REWARD_ABS_MEAN,),
    "replay/bytes_per_transition": (REPLAY_BYTES_PER_TRANSITION,),
    "replay/added": (REPLAY_ADDED,),
    # Updates per env step past learning_starts this iteration (= algo.updates_per_env_step), and
    # how many updates older than the learner's the weights that sampled the data were.
    "replay/ratio": (REPLAY_RATIO,),
    "sampling/policy_lag_mean": (POLICY_LAG_MEAN,),
    "sampling/policy_lag_max": (POLICY_LAG_MAX,),
    "sampling/weights_missed_iters": (WEIGHTS_MISSED_ITERS,),
    # Iterations since the longest-silent env runner delivered a fragment; runners that
    # delivered none this iteration (the `runner_silent` health rule).
    "sampling/runner_silent_iters": (RUNNER_SILENT_ITERS,),
    "sampling/runners_silent": (RUNNERS_SILENT,),
    # Remote env runners healthy now, and how often RLlib has replaced one so far.
    "sampling/runners_healthy": (M.FAULT_TOLERANCE_STATS, "num_healthy_workers"),
    "sampling/runner_restarts": (M.FAULT_TOLERANCE_STATS, "num_remote_worker_restarts"),
    # Seconds per iteration spent in each phase of `TD3.training_step` (RLlib's timers).
    "perf/sample_s": (M.TIMERS, M.ENV_RUNNER_SAMPLING_TIMER),
    "perf/replay_add_s": (M.TIMERS, M.REPLAY_BUFFER_ADD_DATA_TIMER),
    "perf/replay_sample_s": (M.TIMERS, M.REPLAY_BUFFER_SAMPLE_TIMER),
    "perf/learn_s": (M.TIMERS, M.LEARNER_UPDATE_TIMER),
    "perf/weight_sync_s": (M.TIMERS, M.SYNCH_WORKER_WEIGHTS_TIMER),
    "perf/learner_wait_s": (M.TIMERS, LEARNER_WAIT_TIMER),  # asynchronous sampling only
    "perf/iteration_s": (M.TIMERS, M.TRAINING_ITERATION_TIMER),
    # Bytes handed to the learners this iteration (new transitions once, update requests).
    "perf/learner_input_bytes": (LEARNER_INPUT_BYTES,),
}


# Written by rl/train.py into each metrics.jsonl row beside the result's.
RUN_METRICS = ("iteration", "time_s", "perf/env_steps_per_s", "perf/updates_per_s")
# The driving envs' episode metrics (env/...) that evaluation reports too, as eval/...
EVALUATED_ENV_METRICS = ("driving_score", "route_completion", "infractions/", "episode_end/")
# Families whose members depend on the run: gradient groups, the env's metrics (reward terms,
# episode ends, route metrics), the health monitor's, the observation checks' parts.
METRIC_FAMILIES = ("grad/", "env/", "health/", "obs/", *(f"eval/{name}" for name in EVALUATED_ENV_METRICS))


# Every metric with a fixed name, as defined here (not as a run's lookup table may be changed).
METRIC_NAMES = (*RESULT_PATHS, *RUN_METRICS)


def check_metric_name(name: str, key: str) -> None:
    """Raises ConfigError naming `key` when no run reports a metric called `name`."""
    from common.config import ConfigError

    if name in METRIC_NAMES or name.startswith(METRIC_FAMILIES):
        return
    close = [known for known in METRIC_NAMES if known.split("/")[0] == name.split("/")[0]]
    raise ConfigError(
        f"{key}: no run reports a metric {name!r}; metrics are {', '.join(close or METRIC_NAMES)}"
        f"{'' if close else ', '} or of the families {', '.join(f + '...' for f in METRIC_FAMILIES)} (rl/metrics.py)"
    )


# The result key under which callbacks/health_callback.py puts its `health/...` metrics.
HEALTH_RESULTS = "health"
# Metrics of ended episodes (NaN in an iteration where none ended), and of observations
# (`obs/<part>/frozen`: NaN in an iteration holding a single episode), then left out.
# So are the overestimation check's (no episode ended), and the policy lag's and the replay
# ratio's (no fragment arrived).
NAN_WHEN_ABSENT = ("episode/", "eval/", "env/episode_end/", "env/reward/", "env/driving_score",
                   "env/route_completion", "env/infractions/", "obs/", "q/start_", "q/overestimation",
                   "sampling/policy_lag_", "sampling/weights_missed_iters", "replay/ratio")
# The learner's statistics of its updates (a loss, a Q value, a gradient norm): NaN in an
# iteration that made no update, and left out of that one only.
UPDATE_STATS = tuple(name for name, path in RESULT_PATHS.items() if path[0] == "learners") + ("grad/",)


def _lookup(result: dict[str, Any], path: tuple[str, ...]) -> float | None:
    node: Any = result
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    try:
        return float(node)
    except (TypeError, ValueError):
        return None


def _passed_through(node: Any, prefix: str) -> dict[str, float]:
    """Metrics logged under our own stable names (`prefix...`), passed through as they are."""
    if not isinstance(node, dict):
        return {}
    return {k: float(v) for k, v in node.items() if isinstance(k, str) and k.startswith(prefix)}


def summarize(result: dict[str, Any]) -> dict[str, float]:
    """The stable metrics present in one `algo.train()` result.

    RLlib reports episode stats as NaN in an iteration where no episode ended, and the
    learner's as NaN in one that made no update (no fragment arrived in time); those are left
    out. A NaN anywhere else (a loss, a Q value after an update) is real and is kept.
    """
    out = {name: _lookup(result, path) for name, path in RESULT_PATHS.items()}
    # grad/<group>/<stat> from the learner; env/... from callbacks/driving_metrics.py.
    out.update(_passed_through(result.get("learners", {}).get(DEFAULT_MODULE_ID), "grad/"))
    out.update(_passed_through(result.get(M.ENV_RUNNER_RESULTS), "env/"))
    # The evaluation episodes' route metrics and ends: eval/driving_score, eval/infractions/...
    evaluation = result.get(M.EVALUATION_RESULTS, {}).get(M.ENV_RUNNER_RESULTS)
    out.update({"eval/" + k.removeprefix("env/"): v for k, v in _passed_through(evaluation, "env/").items()
                if k.removeprefix("env/").startswith(EVALUATED_ENV_METRICS)})
    out.update(_passed_through(result.get(HEALTH_RESULTS), "health/"))
    out.update(_passed_through(result, "obs/"))  # rl/td3/observation_checks.py
    absent = NAN_WHEN_ABSENT + (UPDATE_STATS if out["learner/updates"] == 0 else ())
    return {
        name: value
        for name, value in out.items()
        if value is not None and not (math.isnan(value) and name.startswith(absent))
    }
