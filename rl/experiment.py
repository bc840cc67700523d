"""From a validated `ExperimentConfig` to an RLlib `TD3Config`: the one place the two meet."""

from __future__ import annotations

from ray.rllib.algorithms.algorithm_config import NotProvided

from callbacks.driving_metrics import DrivingMetricsCallback
from callbacks.health import RunFacts
from callbacks.health_callback import HealthCallback
from rl.config import ConfigError, ExperimentConfig, env_creator
from rl.td3 import TD3Config


def env_config(exp: ExperimentConfig) -> dict:
    """kwargs for `gymnasium.make(exp.env.id, **kwargs)`."""
    kwargs = dict(exp.env.kwargs)
    if exp.env.max_episode_steps is not None:
        kwargs["max_episode_steps"] = exp.env.max_episode_steps
    return kwargs


def renders_rgb(env_id: str) -> bool:
    """Whether the env can draw itself as an RGB image (`render_mode="rgb_array"`)."""
    return "rgb_array" in getattr(env_creator(env_id), "metadata", {}).get("render_modes", [])


CARLA_ENV = "carla_env/CarlaDriving"


def _make_carla_env(context):
    from carla_env.carla_driving import CarlaDrivingEnv

    return CarlaDrivingEnv(worker_index=context.worker_index, **context)


def env_descriptor(exp: ExperimentConfig) -> str:
    """The env as RLlib makes it. The CARLA env goes through Tune's env registry, whose
    creator receives the env runner's `worker_index`: its servers' ports follow from it."""
    if exp.env.id.rpartition(":")[2] == "CarlaDriving-v0":
        from ray.tune.registry import register_env

        register_env(CARLA_ENV, _make_carla_env)
        return CARLA_ENV
    return exp.env.id


FINAL_EVALUATION_ONLY = 2**62  # an evaluation interval no run reaches


def gpus_per_env_runner(exp: ExperimentConfig) -> float:
    per_gpu = exp.resources.carla_servers_per_gpu
    return 1.0 / per_gpu if per_gpu else 0.0


def resource_needs(exp: ExperimentConfig) -> dict[str, tuple[float, str]]:
    """CPUs and GPUs the run asks Ray for, each with the config keys that ask."""
    res, evaluators = exp.resources, exp.evaluation.num_env_runners
    learners = max(res.num_learners, 1)
    runners = res.num_env_runners + evaluators
    also = f" (+ evaluation.num_env_runners={evaluators})" if evaluators else ""
    needs = {
        "CPU": (
            runners * res.cpus_per_env_runner + res.num_learners,
            f"resources.num_env_runners={res.num_env_runners}{also} x cpus_per_env_runner="
            f"{res.cpus_per_env_runner:g}, + num_learners={res.num_learners}",
        ),
        "GPU": (
            learners * res.num_gpus_per_learner + runners * gpus_per_env_runner(exp),
            f"resources.num_gpus_per_learner={res.num_gpus_per_learner:g} x {learners} learner(s), "
            f"+ num_env_runners={res.num_env_runners}{also} / carla_servers_per_gpu={res.carla_servers_per_gpu}",
        ),
    }
    for name, amount in res.custom_resources_per_env_runner.items():
        needs[name] = (
            runners * amount,
            f"resources.num_env_runners={res.num_env_runners}{also} x custom_resources_per_env_runner.{name}={amount:g}",
        )
    return needs


def check_resources(exp: ExperimentConfig, available: dict[str, float]) -> None:
    """Fails fast, naming the keys, when the cluster cannot give what the config asks for
    (Ray would otherwise wait forever for actors it cannot place)."""
    short = [
        f"{kind}: needs {need:g} ({why}), the cluster has {available.get(kind, 0.0):g}"
        for kind, (need, why) in resource_needs(exp).items()
        if need > available.get(kind, 0.0) + 1e-9
    ]
    if short:
        raise ConfigError("the cluster cannot run this config:\n  " + "\n  ".join(short))


def check_placement(exp: ExperimentConfig, nodes: list[dict[str, float]], driver_node: dict[str, float]) -> None:
    """Fails fast, naming the keys, when the cluster's totals suffice but no single node can hold
    an actor the config asks for, or the learner is to be built in this driver (num_learners:
    0) on a node without the GPU it asks for. `nodes`: each alive node's resources."""
    res = exp.resources
    if res.num_learners == 0 and res.num_gpus_per_learner > driver_node.get("GPU", 0.0):
        raise ConfigError(
            f"resources.num_learners=0 builds the learner inside this driver, whose node has "
            f"{driver_node.get('GPU', 0.0):g} GPU, but resources.num_gpus_per_learner="
            f"{res.num_gpus_per_learner:g}: set resources.num_learners=1 to place the learner on a "
            "GPU node (on KubeRay: the learner group), or num_gpus_per_learner=0"
        )
    actors = {"env runner": ({"CPU": res.cpus_per_env_runner, "GPU": gpus_per_env_runner(exp),
                              **res.custom_resources_per_env_runner},
                             "resources.cpus_per_env_runner, carla_servers_per_gpu, custom_resources_per_env_runner")}
    if res.num_learners:
        actors["learner"] = ({"CPU": 1.0, "GPU": res.num_gpus_per_learner}, "resources.num_gpus_per_learner")
    for actor, (needs, keys) in actors.items():
        if not any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in needs.items()) for node in nodes):
            have = "; ".join(", ".join(f"{k} {node.get(k, 0.0):g}" for k in needs) for node in nodes)
            raise ConfigError(
                f"no node of the cluster can hold one {actor} (it needs {', '.join(f'{k} {v:g}' for k, v in needs.items() if v)}: "
                f"{keys}); the nodes have: {have}"
            )


def check_replay_fits(exp: ExperimentConfig, observation_space, action_space) -> None:
    """Fails fast, before Ray starts, when `algo.buffer_size` transitions of this env (its
    `env_spaces`) cannot fit in memory (the replay buffer lives in this driver)."""
    from rl.td3.replay_buffer import TransitionReplayBuffer

    try:
        TransitionReplayBuffer.check_fits(exp.algo.buffer_size, observation_space, action_space)
    except ValueError as e:
        raise ConfigError(f"the replay buffer does not fit: {e}") from None


def check_model_fits_observations(exp: ExperimentConfig, observation_space) -> None:
    """Fails fast, before Ray starts, when `model` cannot read this env's observations (e.g. a
    camera too small for the CNN's layers): one encoder, built on the CPU and dropped."""
    from models.encoders import build_encoder

    try:
        build_encoder(observation_space, exp.model.model_dump())
    except ValueError as e:
        raise ConfigError(f"{e} (env.kwargs gives the observations)") from None


def check_metric_names(exp: ExperimentConfig) -> None:
    """Fails fast when `health.required_metrics` names a metric no run reports (a typo would
    otherwise stop a healthy run, after its grace iterations, for a metric that never comes)."""
    from rl.metrics import check_metric_name

    for name in exp.health.required_metrics:
        check_metric_name(name, "health.required_metrics")


def env_spaces(exp: ExperimentConfig):
    """The env's observation and action spaces, without a simulator: a driving env's from its
    contract, another env's from one instance made and closed at once."""
    import gymnasium as gym

    from carla_env import driving_env_schema

    schema = driving_env_schema(exp.env.id)
    if schema is not None:
        from carla_env.contract import ACTION_SPACE, observation_space

        return observation_space(schema.model_validate(exp.env.kwargs)), ACTION_SPACE
    env = gym.make(exp.env.id, **env_config(exp))
    try:
        return env.observation_space, env.action_space
    finally:
        env.close()


def open_carla_endpoint_pools(exp: ExperimentConfig) -> list:
    """For CARLA with external servers: the pools that share them out, owned by this driver so
    that they outlive any env runner (carla_env/servers.py); none for other envs."""
    from carla_env import driving_env_schema
    from carla_env.config import CarlaEnvConfig
    from carla_env.servers import open_endpoint_pools

    schema = driving_env_schema(exp.env.id)
    env = schema.model_validate(exp.env.kwargs) if schema is not None else None
    if isinstance(env, CarlaEnvConfig) and env.server.mode == "external":
        return open_endpoint_pools(env.server)
    return []


def run_facts(exp: ExperimentConfig) -> RunFacts:
    """What the health rules know besides the metrics: the driving envs document their reward
    bounds and episode length; other envs' bounds come from the rewards observed."""
    import gymnasium

    from carla_env import driving_env_schema
    from carla_env.reward import reward_bounds

    schema = driving_env_schema(exp.env.id)
    bounds = tuple(exp.env.reward_bounds) if exp.env.reward_bounds else None
    max_steps = exp.env.max_episode_steps or gymnasium.spec(exp.env.id.rpartition(":")[2]).max_episode_steps
    if schema is not None:
        driving = schema.model_validate(exp.env.kwargs)
        bounds, max_steps = bounds or reward_bounds(driving), driving.episode.max_steps
    return RunFacts(
        gamma=exp.algo.gamma,
        grad_clip=dict(exp.algo.grad_clip),
        learning_starts=exp.algo.learning_starts,
        actor_lr=exp.algo.actor_lr,
        critic_lr=exp.algo.critic_lr,
        tau=exp.algo.tau,
        reward_bounds=bounds,
        max_episode_steps=max_steps,
        planned_updates=max(exp.experiment.stop_env_steps - exp.algo.learning_starts, 0)
        * exp.algo.updates_per_env_step,
        updates_per_env_step=exp.algo.updates_per_env_step,
    )


def build_td3_config(exp: ExperimentConfig, run_dir: str | None = None) -> TD3Config:
    """With a `run_dir`, the run is monitored: health rules, alerts, W&B (callbacks/)."""
    algo, res, model = exp.algo, exp.resources, exp.model
    # The spaces come from the config, not from remote env runner 1 (RLlib asks it when none
    # are given): a CARLA runner still waiting for its server would fail the build.
    observation_space, action_space = env_spaces(exp)
    config = (
        TD3Config()
        .environment(env=env_descriptor(exp), env_config=env_config(exp),
                     observation_space=observation_space, action_space=action_space)
        .env_runners(
            num_env_runners=res.num_env_runners,
            num_envs_per_env_runner=res.num_envs_per_env_runner,
            rollout_fragment_length=res.rollout_fragment_length,
            sample_timeout_s=res.sample_timeout_s,
            num_cpus_per_env_runner=res.cpus_per_env_runner,
            num_gpus_per_env_runner=gpus_per_env_runner(exp),
            custom_resources_per_env_runner=dict(res.custom_resources_per_env_runner),
        )
        .learners(num_learners=res.num_learners, num_gpus_per_learner=res.num_gpus_per_learner)
        # An env that raises (a CARLA server beyond recovery, a simulator bug) is re-created
        # and reset inside its runner; a runner that dies (its node lost) is replaced.
        .fault_tolerance(
            restart_failed_sub_environments=True,
            restart_failed_env_runners=True,
            max_num_env_runner_restarts=res.max_env_runner_restarts,
            delay_between_env_runner_restarts_s=res.env_runner_restart_delay_s,
        )
        .training(
            gamma=algo.gamma,
            tau=algo.tau,
            actor_lr=algo.actor_lr,
            critic_lr=algo.critic_lr,
            train_batch_size_per_learner=algo.train_batch_size,
            policy_delay=algo.policy_delay,
            policy_noise=algo.policy_noise,
            noise_clip=algo.noise_clip,
            exploration_noise=algo.exploration_noise,
            replay_buffer_capacity=algo.buffer_size,
            num_steps_sampled_before_learning_starts=algo.learning_starts,
            updates_per_env_step=algo.updates_per_env_step,
            learner_batch_max_mb=algo.learner_batch_max_mb,
            grad_clip_by_group=dict(algo.grad_clip),
            async_sampling=res.async_sampling,
            weights_sync_every_updates=res.weights_sync_every_updates,
            learner_timeout_s=res.learner_timeout_s,
            learner_cuda_graphs=res.learner_cuda_graphs,
            learner_bf16=res.learner_bf16,
            learner_channels_last=res.learner_channels_last,
            learner_replay_on_gpu=res.learner_replay_on_gpu,
        )
        .rl_module(
            model_config=model.model_dump()
        )
        .evaluation(
            # Periodic evaluation off (0) still builds the evaluation runners, never due: without
            # them RLlib runs the final `algo.evaluate()` on a training runner, exploring.
            evaluation_interval=exp.evaluation.interval_iters or FINAL_EVALUATION_ONLY,
            evaluation_duration=exp.evaluation.episodes,
            evaluation_duration_unit="episodes",
            # 0: in the driver. Remote evaluation runners reuse the training runners' worker
            # indices; their managed CARLA servers then move up a port block (carla_env/ports.py).
            evaluation_num_env_runners=exp.evaluation.num_env_runners,
            # Videos draw the env's own view (env.render()), which needs the render mode set.
            evaluation_config={"explore": False, "env_config": {**env_config(exp), "render_mode": "rgb_array"}}
            if exp.evaluation.video and renders_rgb(exp.env.id) else NotProvided,
        )
        .callbacks([DrivingMetricsCallback, *([HealthCallback] if run_dir else [])])
        .debugging(seed=exp.experiment.seed)
    )
    if run_dir:
        config.monitoring(
            run_dir=str(run_dir),
            run_facts=run_facts(exp),
            health=exp.health.model_dump(),
            wandb=exp.wandb.model_dump(),
            experiment=exp.to_dict(),
        )
    return config
