"""Asynchronous sampling (resources.async_sampling): env runners sample while the learner learns.

What must hold in that mode as in the synchronous one: the replay ratio (updates per env step
past learning_starts) at its setting over every 10 iterations, the health monitor, evaluation,
checkpoints and resume. What is new: weights go out once `weights_sync_every_updates` updates
were made, and the policy lag (how many updates old the sampling weights were) is reported."""

import json
from pathlib import Path

import numpy as np
import pytest
import ray
from ray.rllib.core import COMPONENT_RL_MODULE, DEFAULT_MODULE_ID

from rl.config import ConfigError, load_config
from rl.experiment import build_td3_config
from rl.td3.td3 import TD3
from rl.train import train
from tests.fault_envs import BROKEN_SENSOR_PENDULUM

ROOT = Path(__file__).resolve().parents[1]
PENDULUM = ROOT / "configs" / "pendulum_td3.yaml"
LEARNING_STARTS, RATIO, FRAGMENT, RUNNERS = 256, 0.5, 16, 2
ASYNC = [
    f"resources.num_env_runners={RUNNERS}",
    f"resources.rollout_fragment_length={FRAGMENT}",
    "resources.async_sampling=true",
    f"algo.learning_starts={LEARNING_STARTS}",
    f"algo.updates_per_env_step={RATIO}",
    "algo.train_batch_size=64",
    "wandb.enabled=false",
]


def read_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_async_sampling_needs_remote_env_runners():
    with pytest.raises(ConfigError, match=r"resources.*async_sampling: true needs num_env_runners >= 1"):
        load_config(PENDULUM, ["resources.async_sampling=true", "resources.num_env_runners=0"])


@pytest.mark.slow
def test_async_run_holds_the_replay_ratio_is_monitored_evaluates_and_resumes(ray_local, tmp_path):
    run_dir = tmp_path / "run"
    common = [*ASYNC, f"experiment.output_dir={tmp_path}", "experiment.checkpoint_every_iters=5",
              "evaluation.interval_iters=10", "evaluation.episodes=1"]
    first = train(load_config(PENDULUM, [*common, "experiment.stop_env_steps=1600"]), run_dir=run_dir,
                  show_progress=False)
    assert first["status"] == "completed", first
    resumed = train(load_config(PENDULUM, [*common, "experiment.stop_env_steps=2560"]), run_dir=run_dir,
                    show_progress=False, resume=True)
    assert resumed["status"] == "completed" and resumed["env_steps"] >= 2560, resumed

    lines = read_lines(run_dir)
    assert [line["iteration"] for line in lines] == list(range(1, len(lines) + 1))  # resumed in line
    # Every 10 iterations past learning_starts: updates / env steps within 5% of the setting.
    learning = [line for line in lines if line["env/steps_sampled"] > LEARNING_STARTS + RUNNERS * FRAGMENT]
    assert len(learning) >= 40, len(learning)
    for a, b in zip(learning, learning[10:]):
        ratio = (b["learner/num_critic_updates"] - a["learner/num_critic_updates"]) / (
            b["env/steps_sampled"] - a["env/steps_sampled"])
        assert ratio == pytest.approx(RATIO, rel=0.05), (a["iteration"], b["iteration"], ratio)
    assert all(line["replay/ratio"] == pytest.approx(RATIO, rel=0.1) for line in learning)
    # Sampled with weights older than the learner's (it learned meanwhile), and said so.
    assert max(line["sampling/policy_lag_mean"] for line in learning) > 0
    assert all(line["sampling/policy_lag_max"] >= line["sampling/policy_lag_mean"] for line in learning)
    # The health monitor ran on every iteration; evaluation ran on schedule, in both parts.
    assert all("health/critical" in line for line in lines)
    assert [line["iteration"] for line in lines if "eval/return_mean" in line] == list(range(10, len(lines) + 1, 10))


@pytest.mark.slow
@pytest.mark.parametrize("every", [1, 24])
def test_weights_go_out_once_the_set_number_of_updates_was_made(ray_local, every):
    exp = load_config(PENDULUM, [*ASYNC, f"resources.weights_sync_every_updates={every}"])
    algo = build_td3_config(exp).build_algo()
    versions, published = [], {}
    publish = TD3._publish_weights

    def recording_publish(self):
        versions.append(self._num_updates)
        publish(self)
        published[self._weights_version] = ray.get(self._published_weights[0])[COMPONENT_RL_MODULE]

    # Per fragment: its runner, the updates made when it arrived, the version it sampled with,
    # and the updates made when the poll that brought it returned.
    arrivals, polled = [], [0]
    store, runners = TD3._store, algo.env_runner_group
    fetch = runners.fetch_ready_async_reqs

    def recording_fetch(*args, **kwargs):
        ready = fetch(*args, **kwargs)
        polled[0] = algo._num_updates
        return ready

    def recording_store(self, fragments):
        arrivals.extend((f.runner_index, self._num_updates, f.weights_version, polled[0]) for f in fragments)
        return store(self, fragments)

    algo._publish_weights = recording_publish.__get__(algo)
    algo._store = recording_store.__get__(algo)
    runners.fetch_ready_async_reqs = recording_fetch
    try:
        lags = []
        for _ in range(20):
            lags.append(algo.train().get("policy_lag_max", 0))
        # What each runner holds is exactly the version it says it samples with.
        held = algo.env_runner_group.foreach_env_runner(
            lambda runner: (runner._td3_weights_version, runner.module.get_state()),
            local_env_runner=False)
    finally:
        algo.stop()
    assert len(held) == RUNNERS
    for version, state in held:
        expected = published[version][DEFAULT_MODULE_ID]
        assert state.keys() == expected.keys()
        assert all(np.array_equal(state[k], expected[k]) for k in state), version
    gaps = [b - a for a, b in zip([0, *versions], versions)]
    # Each fragment arriving owes FRAGMENT * RATIO = 8 updates; weights go out at the first
    # learner call that brings the updates since the last sync to `every` or more.
    per_arrival = FRAGMENT * RATIO
    assert len(versions) >= 5 and all(every <= gap < every + per_arrival for gap in gaps), gaps
    # Sampling weights are never older than what the runners were last sent allows. A runner
    # gets its next request once the poll that brought its fragment returned (before or after
    # that fragment is stored), with the newest weights: at most `every - 1` updates older than
    # the learner then. So a fragment lags by the updates made since that poll, plus those;
    # however long it took (a loaded machine slows one runner more than the other).
    assert 0 < max(lags) == max(updates - version for _, updates, version, _ in arrivals), lags
    previous_poll = {}  # runner -> updates made when the poll that brought its last fragment returned
    for runner, updates, version, poll in arrivals:
        assert updates - version <= updates - previous_poll.get(runner, 0) + every - 1, (runner, updates, version)
        previous_poll[runner] = poll


def test_the_observation_checks_see_every_fragment_of_an_iteration_not_the_last_to_arrive(ray_local, tmp_path):
    """A dead sensor (every observation 0, across resets): one fragment of 16 steps never spans
    two episodes, an iteration's fragments from two runners do, and so show the sensor frozen."""
    exp = load_config(PENDULUM, [
        *ASYNC, f"env.id={BROKEN_SENSOR_PENDULUM}", f"env.kwargs={json.dumps({'at_step': 0, 'value': 0.0})}",
        f"experiment.output_dir={tmp_path}", "evaluation.interval_iters=0", "evaluation.episodes=1",
    ])
    summary = train(exp, run_dir=tmp_path / "run", show_progress=False)
    assert summary["status"] == "stopped_unhealthy" and summary["stopped_by"] == ["observation_frozen"], summary
    assert summary["iterations"] <= 5, summary
