"""TD3 (Fujimoto, van Hoof, Meger, ICML 2018) as an RLlib algorithm on the new API stack.

Shaped like RLlib's own off-policy algorithms (DQN, SAC, TQC): a config, an algorithm whose
`training_step` samples, stores, replays and updates, a learner and an RL module. One thing
differs: the replay path. Each iteration, the env runners collect `rollout_fragment_length` steps
each; the new transitions go once to the replay, which lives with the learners
(rl/td3/learner_replay.py: a flat `TransitionReplayBuffer` per learner); then the learners run
`updates_per_env_step` minibatch updates per new env step, sampling their own minibatches, in
one call (a few for image batches, bounded by `learner_batch_max_mb`). RLlib's overhead is per
call, not per gradient step, and no minibatch crosses a process boundary, so this keeps TD3's
one-update-per-step ratio at a useful speed.

Two ways to interleave sampling and learning, the same updates per env step in both:
- synchronous (the default): all runners sample, then the learner learns, then weights go out;
- asynchronous (`async_sampling`): each runner always has one sample request in flight; the
  driver learns from each fragment as it arrives while the others go on sampling (the way
  Ape-X and RLlib's IMPALA keep both sides busy). The replay ratio cannot drift: updates are
  owed only for steps received, and a runner gets its next request only after its last
  fragment arrived, so neither side runs more than one fragment ahead of the other.
"""

from __future__ import annotations

import bisect
import os
import time
from typing import NamedTuple

import numpy as np
import ray
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    REPLAY_BUFFER_ADD_DATA_TIMER,
    REPLAY_BUFFER_SAMPLE_TIMER,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TIMERS,
)

from rl.config import DEFAULT_GRAD_CLIP, ModelSection
from rl.td3.observation_checks import observation_stats
from rl.td3.learner_replay import ReplayShards
from rl.td3.start_values import EpisodeStarts, start_values

REPLAY_BUFFER_SIZE = "replay_buffer_size"
# The lowest and highest reward seen so far: the observed return bound the health checks use
# when an env documents none.
REPLAY_REWARD_MIN, REPLAY_REWARD_MAX = "replay_reward_min", "replay_reward_max"
REPLAY_REWARD_ABS_MEAN = "replay_reward_abs_mean"  # the reward scale the health rules divide by
REPLAY_BYTES_PER_TRANSITION = "replay_bytes_per_transition"  # memory one stored transition takes
REPLAY_ADDED = "replay_added"  # transitions the learners' replay ever took in
# Bytes handed to the learners this iteration (new transitions, update requests), serialized: what
# crosses to learners in other processes (rl/td3/learner_replay.py).
LEARNER_INPUT_BYTES = "learner_input_bytes"
# The overestimation diagnostic (rl/td3/start_values.py), on episodes finished this iteration.
START_Q_MEAN, START_RETURN_MEAN = "start_q_mean", "start_return_mean"
OVERESTIMATION = "overestimation"
UPDATE_CREDIT = "td3_update_credit"  # checkpoint key
# Learner updates between the weights a fragment was sampled with and the learner's when the
# fragment arrives (0 in the synchronous loop): how off-policy asynchronous sampling makes it.
POLICY_LAG_MEAN, POLICY_LAG_MAX = "policy_lag_mean", "policy_lag_max"
# Iterations, when a fragment was requested, since weights newer than the ones its runner held
# were due (0: it had the newest): grows by one an iteration once new weights stop reaching a
# runner (`TD3._weights_missed_iters`).
WEIGHTS_MISSED_ITERS = "weights_missed_iters"
# Updates per env step past `learning_starts`, this iteration: `updates_per_env_step` held.
REPLAY_RATIO = "replay_ratio"
# Learner updates made this iteration: 0 where no fragment arrived (every runner slower than
# `sample_timeout_s`), and then the learner's loss and Q statistics have nothing to report.
ITERATION_UPDATES = "iteration_updates"
# Iterations since the longest-silent env runner last delivered a fragment, and how many runners
# delivered none this iteration: one hung runner among several (its simulator frozen) leaves the
# total of sampled steps growing, so `sampling_stalled` cannot see it.
RUNNER_SILENT_ITERS, RUNNERS_SILENT = "runner_silent_iters", "runners_silent"
# Asynchronous sampling: seconds this iteration the learner waited with nothing to learn from.
LEARNER_WAIT_TIMER = "learner_wait_for_samples"
SAMPLE_TAG = "td3_sample"
POLL_S = 0.005  # how long one wait for arriving fragments blocks before the next look


class TD3Config(AlgorithmConfig):
    """TD3 settings; defaults are the TD3 author's reference code (github.com/sfujim/TD3)."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or TD3)
        self.gamma = 0.99
        self.tau = 0.005
        self.actor_lr = 3e-4
        self.critic_lr = 3e-4
        self.train_batch_size_per_learner = 256
        self.policy_delay = 2
        self.policy_noise = 0.2
        self.noise_clip = 0.5
        self.exploration_noise = 0.1
        self.replay_buffer_capacity = 1_000_000
        self.num_steps_sampled_before_learning_starts = 25_000
        self.updates_per_env_step = 1.0
        self.rollout_fragment_length = 64
        # Upper bound on the replayed transitions handed to one learner call: image batches
        # (56 KB per 4x84x84 transition as the learner gets it) would otherwise take GBs per iteration.
        self.learner_batch_max_mb = 256.0
        # Sampling overlaps learning (see the module docstring); weights go to the runners after
        # this many updates since the last time.
        self.async_sampling = False
        self.weights_sync_every_updates = 1
        # Seconds a call to the learners may take before it is an error (`ReplayShards`).
        self.learner_timeout_s = 600.0
        # A learner on a GPU replays its updates from CUDA graphs (rl/td3/captured_update.py);
        # bf16: forward passes and losses under bf16 autocast (weights and optimizers stay fp32).
        self.learner_cuda_graphs = True
        self.learner_bf16 = False
        self.learner_channels_last = False  # convolution weights and activations as NHWC
        self.learner_replay_on_gpu = True  # a GPU learner samples from a copy of its replay there
        # RLlib gathers every runner's connector states after each iteration, to merge them: a
        # blocking call that queues behind a fragment in flight, and waits 10 s for a hung runner.
        # Our connectors hold no state (no observation filters); the env step count still goes
        # out to the runners (RLlib's broadcast, which does not wait), for the warm-up's end.
        self.merge_env_runner_states = False
        # Module-wise L2 clipping limits (None: no clipping, stated explicitly); RLlib's own
        # one-limit-for-all `grad_clip` stays off.
        self.grad_clip_by_group = dict(DEFAULT_GRAD_CLIP)
        # Run monitoring (callbacks/health_callback.py), set by `monitoring()`.
        self.run_dir: str | None = None
        self.run_facts = None
        self.health_config: dict = {}
        self.wandb_config: dict = {}
        self.experiment_config: dict = {}
        self.grad_clip = None
        # The module acts in [-1, 1]; RLlib rescales to the env's bounds (no clipping needed).
        self.normalize_actions = True
        self.clip_actions = False
        self.evaluation_config = {"explore": False}

    def training(
        self,
        *,
        tau: float = NotProvided,
        actor_lr: float = NotProvided,
        critic_lr: float = NotProvided,
        policy_delay: int = NotProvided,
        policy_noise: float = NotProvided,
        noise_clip: float = NotProvided,
        exploration_noise: float = NotProvided,
        replay_buffer_capacity: int = NotProvided,
        num_steps_sampled_before_learning_starts: int = NotProvided,
        updates_per_env_step: float = NotProvided,
        learner_batch_max_mb: float = NotProvided,
        grad_clip_by_group: dict = NotProvided,
        async_sampling: bool = NotProvided,
        weights_sync_every_updates: int = NotProvided,
        learner_timeout_s: float = NotProvided,
        learner_cuda_graphs: bool = NotProvided,
        learner_bf16: bool = NotProvided,
        learner_channels_last: bool = NotProvided,
        learner_replay_on_gpu: bool = NotProvided,
        **kwargs,
    ) -> "TD3Config":
        super().training(**kwargs)
        for name, value in locals().items():  # every TD3 keyword that was given
            if name not in ("self", "kwargs", "__class__") and value is not NotProvided:
                setattr(self, name, value)
        return self

    def validate(self) -> None:
        super().validate()
        checks = {
            "gamma": 0.0 < self.gamma < 1.0,
            "tau": 0.0 < self.tau <= 1.0,
            "actor_lr": self.actor_lr > 0.0,
            "critic_lr": self.critic_lr > 0.0,
            "policy_delay": self.policy_delay >= 1,
            "policy_noise": self.policy_noise >= 0.0,
            "noise_clip": self.noise_clip >= 0.0,
            "exploration_noise": self.exploration_noise >= 0.0,
            "replay_buffer_capacity": self.replay_buffer_capacity >= self.total_train_batch_size,
            "updates_per_env_step": self.updates_per_env_step > 0.0,
            "learner_batch_max_mb": self.learner_batch_max_mb > 0.0,
            "weights_sync_every_updates": self.weights_sync_every_updates >= 1,
            "learner_timeout_s": self.learner_timeout_s > 0.0,
            "async_sampling": not self.async_sampling or self.num_env_runners >= 1 or self.in_evaluation,
            "grad_clip_by_group": all(
                limit is None or limit > 0 for limit in self.grad_clip_by_group.values()
            ),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                "TD3Config: out of range: " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad)
            )
        if not self.enable_rl_module_and_learner or not self.enable_env_runner_and_connector_v2:
            raise ValueError("TD3 runs on RLlib's new API stack only")
        if self.framework_str != "torch":
            raise ValueError(f"TD3 supports framework='torch' only, got {self.framework_str!r}")

    def monitoring(
        self, *, run_dir: str, run_facts, health: dict, wandb: dict, experiment: dict
    ) -> "TD3Config":
        """What the health callback needs: where the run writes, facts about the run (gamma,
        reward bounds, clip limits: callbacks/health.py RunFacts), the `health:` and `wandb:`
        sections and the whole resolved experiment config (for W&B)."""
        self.run_dir, self.run_facts = run_dir, run_facts
        self.health_config, self.wandb_config, self.experiment_config = health, wandb, experiment
        return self

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from rl.td3.td3_rl_module import TD3TorchRLModule

        return RLModuleSpec(module_class=TD3TorchRLModule)

    def get_default_learner_class(self):
        from rl.td3.td3_learner import TD3TorchLearner

        return TD3TorchLearner

    @property
    def _model_config_auto_includes(self) -> dict:
        # Network defaults (rl/config.py ModelSection: the reference code's 256-256 ReLU, the
        # Nature-DQN CNN), which a user's `model_config` overrides key by key; and the
        # exploration settings, since the module explores itself.
        return (
            super()._model_config_auto_includes
            | ModelSection().model_dump()
            | {
                "exploration_noise": self.exploration_noise,
                "learning_starts": self.num_steps_sampled_before_learning_starts,
            }
        )


class TD3(Algorithm):
    @classmethod
    def get_default_config(cls) -> TD3Config:
        return TD3Config()

    def setup(self, config: TD3Config) -> None:
        super().setup(config)
        self.replay = ReplayShards(self.learner_group, self.config.learner_timeout_s)  # the learners hold it
        self._update_credit = 0.0  # fractional updates owed to sampled steps
        self._episode_starts = EpisodeStarts(config.gamma)
        # Learner updates made by this process, and how many of them the runners' weights have
        # seen: the policy lag of a fragment is the difference when it arrives.
        self._num_updates = self._weights_version = 0
        self._published_weights: list = []  # [ObjectRef] once published, for the sample requests
        self._iterations_run = 0  # by this process (not restored from a checkpoint)
        self._last_delivery: dict[int, int] = {}  # env runner index -> iteration of its last fragment
        # Learner updates made by the end of each iteration of this process (non-decreasing).
        self._updates_at_end: list[int] = []

    def training_step(self) -> None:
        self._iterations_run += 1
        runners = self.env_runner_group
        if runners.num_remote_workers() > 0 and runners.num_healthy_remote_workers() == 0:
            self._raise_if_runners_gone()
        # This iteration's counts, times and episodes, logged at its end (`_log_iteration`).
        self._this_iteration = {"updates": 0, "learning_steps": 0, "sample_s": 0.0, "learn_s": 0.0,
                                "wait_s": 0.0, "lags": [], "missed": [], "episodes": [], "finished": [],
                                "bytes_before": self.replay.bytes_sent}
        if self.config.async_sampling:
            self._sample_and_learn_async()
        else:
            self._sample_then_learn()
        self._log_iteration()

    def _sample_then_learn(self) -> None:
        """Synchronous: every runner samples one fragment, then the learner makes the updates
        owed, then the new weights are published (the next requests carry them)."""
        runners = self.env_runner_group
        request = {"weights": self._published_weights, "version": self._weights_version,
                   "requested_at": self._iterations_run}
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            if runners.num_remote_workers() > 0:
                # A runner that has not answered within the timeout is left out of this iteration.
                fragments = runners.foreach_env_runner(
                    _sample_with_metrics, kwargs=request, local_env_runner=False,
                    timeout_seconds=self.config.sample_timeout_s,
                )
            else:
                fragments = [_sample_with_metrics(runners.local_env_runner, **request)]
        self._store(fragments)  # one call to the learners for them all
        self._learn_owed()
        if self._num_updates > self._weights_version:
            self._publish_weights()

    def _sample_and_learn_async(self) -> None:
        """Asynchronous: runners sample while the driver learns. One iteration ends when as many
        steps arrived as a synchronous iteration samples (`sample_timeout_s` at most)."""
        config = self.config
        runners = self.env_runner_group
        steps_per_iteration = (
            config.num_env_runners * config.num_envs_per_env_runner * config.get_rollout_fragment_length()
        )
        received = 0
        deadline = time.monotonic() + config.sample_timeout_s
        while received < steps_per_iteration and time.monotonic() < deadline:
            # Every healthy runner without a request in flight gets one (RLlib's in-flight limit,
            # one per runner, drops the rest).
            self._request_samples()
            if runners.num_in_flight_async_reqs(SAMPLE_TAG) == 0:
                break  # no healthy runner: RLlib restores them between iterations
            waited = time.perf_counter()
            arrived = runners.fetch_ready_async_reqs(tags=SAMPLE_TAG, timeout_seconds=POLL_S)
            self._this_iteration["wait_s"] += time.perf_counter() - waited
            for _, fragment in arrived:
                received += self._store([fragment])
                # The runner that sent this samples its next fragment while we learn from it.
                self._request_samples()
                self._learn_owed()
                if self._num_updates - self._weights_version >= config.weights_sync_every_updates:
                    self._publish_weights()

    def _request_samples(self) -> None:
        """Sample requests carry the newest published weights: a runner loads them first if it
        has older ones. (RLlib's `sync_weights` would queue them behind the fragment being
        sampled, and drop later ones while that one waits.)"""
        self.env_runner_group.foreach_env_runner_async(
            _sample_with_metrics,
            tag=SAMPLE_TAG,
            kwargs={"weights": self._published_weights, "version": self._weights_version,
                    "requested_at": self._iterations_run},
        )

    def _store(self, fragments: list[Fragment]) -> int:
        """Adds sampled fragments to the replay, logs what they show, and owes the learner
        `updates_per_env_step` updates per new step past `learning_starts`. Returns the steps."""
        config = self.config
        self.metrics.aggregate([f.metrics for f in fragments], key=ENV_RUNNER_RESULTS)
        episodes = [episode for f in fragments for episode in f.episodes]
        with self.metrics.log_time((TIMERS, REPLAY_BUFFER_ADD_DATA_TIMER)):
            new_steps = self.replay.add(episodes)
        finished = self._episode_starts.add(episodes)
        for f in fragments:
            self._last_delivery[f.runner_index] = self._iterations_run
            self._this_iteration["lags"].append(self._num_updates - f.weights_version)
            self._this_iteration["missed"].append(self._weights_missed_iters(f.weights_version, f.requested_at))
        self._this_iteration["episodes"] += episodes  # for the observation checks, at its end
        lifetime_steps = self.metrics.peek(
            (ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0
        )
        steps_past_start = lifetime_steps - config.num_steps_sampled_before_learning_starts
        if steps_past_start > 0:
            self._this_iteration["finished"] += finished  # for the overestimation check, at its end
        # One update per env step sampled after `learning_starts` (the reference code's loop).
        learning_steps = max(0, min(new_steps, steps_past_start))
        self._this_iteration["learning_steps"] += learning_steps
        self._update_credit += learning_steps * config.updates_per_env_step
        return new_steps

    def _weights_missed_iters(self, held: int, requested_at: int) -> int:
        """Iterations that had ended, when a fragment was requested, since the learner made the
        updates after which weights newer than the runner's were due (`weights_sync_every_updates`
        past them): 0 for a runner with the newest, one more each iteration once new weights stop
        reaching it. Counted to the request, not the arrival: a slow fragment is not stale."""
        due = bisect.bisect_left(self._updates_at_end, held + self.config.weights_sync_every_updates)
        ended = requested_at - 1
        return ended - due if due < ended else 0

    def _learn_owed(self) -> None:
        num_updates = int(self._update_credit)
        if num_updates > 0 and self.replay.ready:
            self._update_credit -= num_updates
            self._learn(num_updates)

    def _publish_weights(self) -> None:
        """The learner's weights into the object store, once, for the sample requests from now
        on to carry (in a list, so that Ray passes the reference and only a runner with older
        weights fetches them). Runners say which version they sampled with: the policy lag is
        measured on what they hold, so weights that stop reaching them show (`weights_stale`)."""
        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
            state = self.learner_group.get_state(
                components=f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}", inference_only=True
            )[COMPONENT_LEARNER]
            weights = {COMPONENT_RL_MODULE: state[COMPONENT_RL_MODULE]}
            self._published_weights = [ray.put(weights)]
            if self.env_runner is not None:
                # The driver's own runner: RLlib restores failed runners from its state.
                self.env_runner.set_state(weights)
                self.env_runner._td3_weights_version = self._num_updates
        self._weights_version = self._num_updates

    def _log_iteration(self) -> None:
        metrics, iteration = self.metrics, self._this_iteration
        # Over every fragment of the iteration (asynchronous sampling stores several).
        for name, value in observation_stats(iteration["episodes"]).items():
            metrics.log_value(name, value, window=1)
        if iteration["finished"]:
            self._log_overestimation(iteration["finished"])
        metrics.log_value(REPLAY_BUFFER_SIZE, len(self.replay), window=1)
        metrics.log_value(REPLAY_ADDED, self.replay.added, window=1)
        if len(self.replay):
            low, high = self.replay.reward_range
            metrics.log_value(REPLAY_REWARD_MIN, low, window=1)
            metrics.log_value(REPLAY_REWARD_MAX, high, window=1)
            metrics.log_value(REPLAY_REWARD_ABS_MEAN, self.replay.reward_abs_mean, window=1)
            metrics.log_value(REPLAY_BYTES_PER_TRANSITION, self.replay.bytes_per_transition, window=1)
        metrics.log_value(LEARNER_INPUT_BYTES, self.replay.bytes_sent - iteration["bytes_before"], window=1)
        if iteration["lags"]:
            metrics.log_value(POLICY_LAG_MEAN, float(np.mean(iteration["lags"])), window=1)
            metrics.log_value(POLICY_LAG_MAX, max(iteration["lags"]), window=1)
            metrics.log_value(WEIGHTS_MISSED_ITERS, max(iteration["missed"]), window=1)
        self._updates_at_end.append(self._num_updates)
        metrics.log_value(ITERATION_UPDATES, iteration["updates"], window=1)
        if iteration["learning_steps"]:
            metrics.log_value(REPLAY_RATIO, iteration["updates"] / iteration["learning_steps"], window=1)
        if iteration["updates"]:
            # Same reduction as `log_time` (EMA over iterations), of this iteration's totals.
            metrics.log_value((TIMERS, REPLAY_BUFFER_SAMPLE_TIMER), iteration["sample_s"])
            metrics.log_value((TIMERS, LEARNER_UPDATE_TIMER), iteration["learn_s"])
        if self.config.async_sampling:
            metrics.log_value((TIMERS, LEARNER_WAIT_TIMER), iteration["wait_s"])
        runner_indices = range(1, self.config.num_env_runners + 1) if self.config.num_env_runners else [0]
        silent = [self._iterations_run - self._last_delivery.get(i, 0) for i in runner_indices]
        metrics.log_value(RUNNER_SILENT_ITERS, max(silent), window=1)
        metrics.log_value(RUNNERS_SILENT, sum(s > 0 for s in silent), window=1)

    # Checkpoints carry the update schedule, so a resumed run goes on with the same counters. The
    # replay buffer is not in this state: rl/checkpoints.py saves it beside the checkpoints, in
    # chunks written once (a pickle would hold a second full copy in memory and on disk each time).
    def get_state(self, components=None, *, not_components=None, **kwargs):
        state = super().get_state(components, not_components=not_components, **kwargs)
        state[UPDATE_CREDIT] = self._update_credit
        return state

    def set_state(self, state) -> None:
        super().set_state(state)
        if UPDATE_CREDIT in state:
            self._update_credit = state[UPDATE_CREDIT]

    def cleanup(self) -> None:
        self._kill_unresponsive_runners()
        super().cleanup()
        # Outside Tune, Ray's Trainable made an empty ~/ray_results/<time>... folder for this
        # algorithm; runs write to their own run directory, so the folder would only pile up.
        if self._storage is None and self.logdir and os.path.isdir(self.logdir) and not os.listdir(self.logdir):
            os.rmdir(self.logdir)

    def _raise_if_runners_gone(self) -> None:
        """RLlib leaves env runners that used up their restarts dead, and iterations then go on
        with nothing to sample, as fast as they can, forever. A run none of whose runners can
        come back ends with an error instead."""
        for actor in self.env_runner_group._worker_manager.actors().values():
            try:
                ray.get(actor.ping.remote(), timeout=self.config.sample_timeout_s)
                return
            except ray.exceptions.ActorDiedError:
                continue
            except Exception:  # restarting, or busy: RLlib restores it
                return
        raise RuntimeError(
            f"every env runner failed and none can be restarted (resources.max_env_runner_restarts="
            f"{self.config.max_num_env_runner_restarts} used up): nothing can sample anymore. Why "
            "they failed: the env runners' errors above, or in the Ray logs of their nodes."
        )

    def _kill_unresponsive_runners(self) -> None:
        """RLlib's stop waits for every env runner to run its `stop`, without a timeout: one
        stuck in its env (a frozen simulator) would hold the run's end, and the process, forever.
        Runners that cannot answer within `sample_timeout_s` (a fragment in flight finishes
        first) are killed instead, training and evaluation runners alike."""
        for group in (self.env_runner_group, self.eval_env_runner_group):
            if group is None:
                continue
            manager = group._worker_manager  # RLlib exposes no actor handles
            answered = {
                result.actor_id
                for result in manager.foreach_actor(
                    lambda runner: None, healthy_only=False, timeout_seconds=self.config.sample_timeout_s
                )
            }
            for actor_id, actor in manager.actors().items():
                if actor_id not in answered:
                    ray.kill(actor)

    def _log_overestimation(self, finished: list) -> None:
        """Q1 at the starts of the episodes that just ended, against what they returned."""
        results = self.learner_group.foreach_learner(start_values, starts=finished)
        q_start, returns = next(iter(results)).get()
        self.metrics.log_value(START_Q_MEAN, float(q_start.mean()), window=1)
        self.metrics.log_value(START_RETURN_MEAN, float(returns.mean()), window=1)
        self.metrics.log_value(OVERESTIMATION, float((q_start - returns).mean()), window=1)

    def _learn(self, num_updates: int) -> None:
        """The learners make `num_updates` minibatch updates, each replayed from its own shard."""
        lifetime_steps = self.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0)
        start = time.perf_counter()
        learner_results, sample_s = self.replay.update(num_updates, {NUM_ENV_STEPS_SAMPLED_LIFETIME: lifetime_steps})
        self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)
        self._num_updates += num_updates
        self._this_iteration["updates"] += num_updates
        self._this_iteration["sample_s"] += sample_s
        self._this_iteration["learn_s"] += time.perf_counter() - start - sample_s


class Fragment(NamedTuple):
    episodes: list
    metrics: dict  # the env runner's metrics since its last fragment
    weights_version: int  # of the weights it holds (0: the ones it was built with)
    requested_at: int  # the iteration the request was sent in
    runner_index: int


def _sample_with_metrics(env_runner, weights: list, version: int, requested_at: int) -> Fragment:
    """Runs on the env runner: loads `weights` ([ObjectRef], or [] before the first update)
    unless it has that `version` already, then samples one fragment."""
    if weights and getattr(env_runner, "_td3_weights_version", 0) != version:
        env_runner.set_state(ray.get(weights[0]))
        env_runner._td3_weights_version = version
    return Fragment(env_runner.sample(), env_runner.get_metrics(), getattr(env_runner, "_td3_weights_version", 0),
                    requested_at, env_runner.worker_index)
