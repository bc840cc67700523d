"""Driving metrics from the env runners: how episodes end, what the reward is made of, and how
the simulator backend is doing. Envs without these (Pendulum) simply report none of them.

    env/episode_end/<reason>   fraction of the last 100 episodes that ended so (collision,
                               off_route, stuck, route_complete, time_limit, backend_failure)
    env/reward/<term>          per-episode sum of each reward term, mean over the last 100
    env/driving_score, env/route_completion
                               the CARLA leaderboard's route metrics (carla_env/driving_score.py),
                               mean over the last 100 episodes, for envs that drive a route
    env/infractions/<kind>     infractions per episode of each kind, mean over the last 100
    env/server_restarts, env/tick_timeouts, env/sensor_timeouts, env/reset_failures,
    env/step_failures, env/connect_failures, env/client_failures
                               lifetime totals over all env runners (carla_env/supervised.py)
    env/sim_fps, env/sim_speedup
                               server ticks, and simulated seconds, per wall-clock second
"""

from __future__ import annotations

from ray.rllib.callbacks.callbacks import RLlibCallback

from carla_env.driving_score import INFRACTIONS
from carla_env.reward import TERMS
from carla_env.supervised import LOSS_COUNTERS

EPISODE_ENDS = ("collision", "off_route", "stuck", "route_complete", "time_limit", "backend_failure")
BACKEND_COUNTERS = ("server_restarts", *LOSS_COUNTERS)
# Episodes averaged over, as RLlib's own episode_return_mean (metrics_num_episodes_for_smoothing).
EPISODE_WINDOW = 100


class DrivingMetricsCallback(RLlibCallback):
    def __init__(self):
        super().__init__()
        # Per env slot: which env the counts came from (its id) and the counts last logged.
        self._seen: dict[int, tuple[int, dict[str, float]]] = {}

    def on_episode_end(self, *, episode, prev_episode_chunks=None, metrics_logger=None, **kwargs):
        infos = [i for chunk in [*(prev_episode_chunks or []), episode] for i in chunk.get_infos()]
        if not infos or "episode_end" not in infos[-1]:
            return
        end = infos[-1]["episode_end"]
        for reason in EPISODE_ENDS:
            metrics_logger.log_value(
                f"env/episode_end/{reason}", float(end == reason), window=EPISODE_WINDOW
            )
        for term in TERMS:
            total = sum(i.get("reward_terms", {}).get(term, 0.0) for i in infos)
            metrics_logger.log_value(f"env/reward/{term}", total, window=EPISODE_WINDOW)
        if "driving_score" in infos[-1]:
            for name in ("driving_score", "route_completion"):
                metrics_logger.log_value(f"env/{name}", infos[-1][name], window=EPISODE_WINDOW)
            for kind in INFRACTIONS:
                metrics_logger.log_value(f"env/infractions/{kind}", infos[-1]["infractions"][kind],
                                         window=EPISODE_WINDOW)

    def on_sample_end(self, *, env_runner=None, metrics_logger=None, **kwargs):
        envs = getattr(getattr(env_runner, "env", None), "unwrapped", None)
        for slot, env in enumerate(getattr(envs, "envs", [])):
            health = getattr(env.unwrapped, "backend_health", None)
            if health is None:
                continue
            counters = health()
            env_id, seen = self._seen.get(slot, (id(env), {}))
            if env_id != id(env):
                seen = {}  # RLlib re-created this env: its counters started again from 0
            for name in BACKEND_COUNTERS:
                if name in counters:  # log what is new since the last sample: sums over runners
                    before = seen.get(name, 0.0)
                    new = counters[name] - before if counters[name] >= before else counters[name]
                    seen[name] = counters[name]
                    metrics_logger.log_value(f"env/{name}", new, reduce="lifetime_sum")
            self._seen[slot] = (id(env), seen)
            for rate in ("sim_fps", "sim_speedup"):
                if counters.get(rate):
                    metrics_logger.log_value(f"env/{rate}", counters[rate], window=10)
