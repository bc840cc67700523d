"""callbacks/driving_metrics.py: episode ends, reward terms and backend health as metrics."""

from types import SimpleNamespace

import pytest
from ray.rllib.utils.metrics.metrics_logger import MetricsLogger

from callbacks.driving_metrics import DrivingMetricsCallback


def chunk(infos):
    return SimpleNamespace(get_infos=lambda: infos)


def step_info(end=None, progress=1.0, collision=0.0):
    terms = {"progress": progress, "lane_centering": -0.1, "collision": collision, "off_route": 0.0, "comfort": 0.0}
    return {"reward_terms": terms, "episode_end": end}


def test_episode_end_reasons_are_fractions_and_reward_terms_are_summed_over_all_chunks():
    callback, logger = DrivingMetricsCallback(), MetricsLogger()
    # An episode that spanned two sample() calls: the reset info, then 3 steps, the last a crash.
    first = chunk([{"reward_terms": {}, "episode_end": None}, step_info()])
    last = chunk([step_info(), step_info(end="collision", progress=0.5, collision=-10.0)])
    callback.on_episode_end(episode=last, prev_episode_chunks=[first], metrics_logger=logger)
    callback.on_episode_end(episode=chunk([step_info(end="time_limit")]), metrics_logger=logger)

    assert logger.peek("env/episode_end/collision") == pytest.approx(0.5)
    assert logger.peek("env/episode_end/time_limit") == pytest.approx(0.5)
    assert logger.peek("env/episode_end/off_route") == 0.0
    # progress: episode 1 = 1 + 1 + 0.5, episode 2 = 1 -> mean 1.75; collision: -10 and 0 -> -5
    assert logger.peek("env/reward/progress") == pytest.approx(1.75)
    assert logger.peek("env/reward/collision") == pytest.approx(-5.0)


def test_envs_without_the_driving_contract_report_nothing():
    callback, logger = DrivingMetricsCallback(), MetricsLogger()
    callback.on_episode_end(episode=chunk([{}, {"TimeLimit.truncated": True}]), metrics_logger=logger)
    plain_env = SimpleNamespace(unwrapped=SimpleNamespace())
    runner = SimpleNamespace(env=SimpleNamespace(unwrapped=SimpleNamespace(envs=[plain_env])))
    callback.on_sample_end(env_runner=runner, metrics_logger=logger)
    assert logger.reduce() == {}


def test_backend_counters_are_lifetime_totals_over_envs_not_double_counted():
    callback, logger = DrivingMetricsCallback(), MetricsLogger()
    health = [
        {"server_restarts": 1, "tick_timeouts": 1, "sensor_timeouts": 0, "sim_fps": 40.0, "sim_speedup": 2.0},
        {"server_restarts": 0, "tick_timeouts": 0, "sensor_timeouts": 2, "sim_fps": 80.0, "sim_speedup": 4.0},
    ]
    envs = [SimpleNamespace(unwrapped=SimpleNamespace(backend_health=lambda i=i: health[i])) for i in range(2)]
    runner = SimpleNamespace(env=SimpleNamespace(unwrapped=SimpleNamespace(envs=envs)))
    callback.on_sample_end(env_runner=runner, metrics_logger=logger)
    health[0] = {**health[0], "server_restarts": 2}  # one more restart before the next sample
    callback.on_sample_end(env_runner=runner, metrics_logger=logger)

    assert logger.peek("env/server_restarts") == 2
    assert logger.peek("env/tick_timeouts") == 1
    assert logger.peek("env/sensor_timeouts") == 2
    assert logger.peek("env/sim_speedup") == pytest.approx(3.0)
    assert logger.peek("env/sim_fps") == pytest.approx(60.0)


def test_an_env_recreated_by_rllib_adds_its_new_counts_and_never_subtracts():
    callback, logger = DrivingMetricsCallback(), MetricsLogger()

    def env(restarts):
        return SimpleNamespace(unwrapped=SimpleNamespace(backend_health=lambda: {"server_restarts": restarts}))

    runner = SimpleNamespace(env=SimpleNamespace(unwrapped=SimpleNamespace(envs=[env(3)])))
    callback.on_sample_end(env_runner=runner, metrics_logger=logger)
    runner.env.unwrapped.envs = [env(1)]  # the env failed; its replacement restarted its server once
    callback.on_sample_end(env_runner=runner, metrics_logger=logger)
    assert logger.peek("env/server_restarts") == 4


def test_summarize_leaves_out_per_episode_nans_but_keeps_a_nan_loss():
    from rl.metrics import summarize

    nan = float("nan")
    result = {
        "env_runners": {"episode_return_mean": nan, "env/episode_end/collision": nan, "env/server_restarts": 1},
        "learners": {"default_policy": {"critic_loss": nan, "grad/critic.head/post_clip_norm": 3.0}},
    }
    summary = summarize(result)
    assert "episode/return_mean" not in summary and "env/episode_end/collision" not in summary
    assert summary["env/server_restarts"] == 1.0
    assert summary["grad/critic.head/post_clip_norm"] == 3.0
    assert summary["losses/critic"] != summary["losses/critic"]  # NaN, kept: it is a real failure
