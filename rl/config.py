"""Experiment configuration: YAML in `configs/`, validated once, at load, into typed objects.

Every key is declared here with its type and its allowed range. An unknown key, a wrong type or
an out-of-range value raises `ConfigError` naming the file, the dotted key and what was
expected, before Ray starts. Single keys can be overridden from the command line with
`--set section.key=value` (the value is parsed as YAML, so `1e-3`, `true`, `[64, 64]` work).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from common.config import ConfigError, Section, format_errors, load_yaml, read_yaml_file, yaml_problem
from rl.storage import SCHEMES as STORAGE_SCHEMES


LayerWidth = Annotated[int, Field(gt=0)]

# Gradient groups of the TD3 module (rl/td3/td3_rl_module.py) and their default limits.
DEFAULT_GRAD_CLIP = {"actor.encoder": 1.0, "actor.head": 1.0, "critic.encoder": 10.0, "critic.head": 10.0}


class ExperimentSection(Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="numpy and gymnasium take 32-bit seeds")
    stop_env_steps: int = Field(gt=0, description="train until this many env steps were sampled")
    output_dir: str = Field(default="runs", min_length=1)
    # Also mirror the run directory here (rl/storage.py): s3://bucket/runs, gs://..., file://...
    storage_uri: str | None = Field(default=None, pattern=rf"^({'|'.join(STORAGE_SCHEMES)})://.+")
    # How long a copy there may hold training up (an unreachable storage retries for many minutes).
    storage_timeout_s: float = Field(default=600.0, gt=0.0)
    checkpoint_every_iters: int = Field(default=50, gt=0)
    keep_checkpoints: int = Field(default=3, ge=1, description="newest periodic ones kept")


class EnvSection(Section):
    id: str = Field(min_length=1, description="a registered gymnasium env id")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    max_episode_steps: int | None = Field(default=None, gt=0)
    # The env's documented per-step reward range [r_min, r_max]: Q must stay within
    # [r_min, r_max] / (1 - gamma). Unset: the driving envs document their own; for other envs
    # the health checks use the rewards observed so far.
    reward_bounds: list[float] | None = Field(default=None, min_length=2, max_length=2)

    @field_validator("reward_bounds")
    @classmethod
    def _ordered(cls, bounds):
        if bounds is not None and not bounds[0] <= bounds[1]:
            raise ValueError(f"expected [r_min, r_max] with r_min <= r_max, got {list(bounds)}")
        return bounds

    @field_validator("id")
    @classmethod
    def _registered(cls, env_id: str) -> str:
        import importlib

        import gymnasium

        module, _, name = env_id.rpartition(":")
        try:
            if module:  # "package:Env-v0": gymnasium.make imports the package that registers it
                importlib.import_module(module)
            gymnasium.spec(name)
        except ImportError as e:
            raise ValueError(f"cannot import {module!r}, which should register the env ({e})") from None
        except gymnasium.error.Error as e:
            raise ValueError(f"not a registered gymnasium env ({e})") from None
        return env_id


class AlgoSection(Section):
    """TD3 hyperparameters. Defaults are those of the TD3 author's reference code."""

    gamma: float = Field(default=0.99, gt=0.0, lt=1.0)
    tau: float = Field(default=0.005, gt=0.0, le=1.0)
    actor_lr: float = Field(default=3e-4, gt=0.0)
    critic_lr: float = Field(default=3e-4, gt=0.0)
    train_batch_size: int = Field(default=256, gt=0)
    policy_delay: int = Field(default=2, ge=1)
    # Noise scales are in units of the action half-range: the module acts in [-1, 1].
    policy_noise: float = Field(default=0.2, ge=0.0)
    noise_clip: float = Field(default=0.5, ge=0.0)
    exploration_noise: float = Field(default=0.1, ge=0.0)
    buffer_size: int = Field(default=1_000_000, gt=0)
    learning_starts: int = Field(default=25_000, ge=0)
    updates_per_env_step: float = Field(default=1.0, gt=0.0)
    # Replayed data per learner call, at most (image batches are split into several calls).
    learner_batch_max_mb: float = Field(default=256.0, gt=0.0)
    # Max L2 norm of each parameter group's gradient; null = no clipping, stated explicitly.
    grad_clip: dict[str, Annotated[float, Field(gt=0.0)] | None] = Field(
        default_factory=lambda: dict(DEFAULT_GRAD_CLIP)
    )

    @field_validator("grad_clip")
    @classmethod
    def _every_group_explicit(cls, limits: dict) -> dict:
        unknown = sorted(set(limits) - set(DEFAULT_GRAD_CLIP))
        missing = sorted(set(DEFAULT_GRAD_CLIP) - set(limits))
        if unknown:
            raise ValueError(f"unknown gradient group(s) {unknown}; groups: {list(DEFAULT_GRAD_CLIP)}")
        if missing:
            raise ValueError(f"no limit for {missing}: give a number, or null for no clipping")
        return limits


class CnnSection(Section):
    """Image encoder (models/encoders.py), used when observations are a dict of image and state.
    Defaults: the Nature-DQN convolutions for 84x84 frames, and SAC-AE's 50 features."""

    channels: list[LayerWidth] = Field(default_factory=lambda: [32, 64, 64], min_length=1)
    kernel_sizes: list[LayerWidth] = Field(default_factory=lambda: [8, 4, 3], min_length=1)
    strides: list[LayerWidth] = Field(default_factory=lambda: [4, 2, 1], min_length=1)
    feature_dim: LayerWidth = 50

    @model_validator(mode="after")
    def _one_entry_per_layer(self) -> "CnnSection":
        lengths = {len(self.channels), len(self.kernel_sizes), len(self.strides)}
        if len(lengths) != 1:
            raise ValueError(
                "channels, kernel_sizes and strides need one entry per conv layer; got lengths "
                f"{len(self.channels)}, {len(self.kernel_sizes)}, {len(self.strides)}"
            )
        return self


class ModelSection(Section):
    actor_hidden: list[LayerWidth] = Field(default_factory=lambda: [256, 256], min_length=1)
    critic_hidden: list[LayerWidth] = Field(default_factory=lambda: [256, 256], min_length=1)
    activation: Literal["relu", "tanh", "elu", "silu"] = "relu"
    cnn: CnnSection = Field(default_factory=CnnSection)
    # The actor reads the critic's image encoder through a stop-gradient (DrQ-v2) instead of
    # training its own: one CNN less to train, and the actor.encoder group is then empty.
    share_encoder: bool = False


class ResourcesSection(Section):
    num_env_runners: int = Field(default=0, ge=0)
    num_envs_per_env_runner: int = Field(default=1, ge=1)
    # Env steps each runner (and vector slot) collects per training iteration. The learner then
    # does `updates_per_env_step` updates per collected step in one call: RLlib's cost is per
    # iteration, so this is where throughput comes from (benchmarks/README.md).
    rollout_fragment_length: int = Field(default=64, ge=1)
    num_learners: int = Field(default=0, ge=0)
    num_gpus_per_learner: float = Field(default=0.0, ge=0.0)
    # Torch intra-op threads in the learner process. More threads than cores starves the
    # env runners (measured: 2.2 s vs 0.09 s per step on 2 cores).
    learner_torch_threads: int = Field(default=1, ge=1)
    # A learner on a GPU: its updates replayed from CUDA graphs (one launch per update instead
    # of hundreds; the eager update's math, rl/td3/captured_update.py), and optionally the
    # forward passes and losses in bf16 (weights and optimizer state stay fp32).
    learner_cuda_graphs: bool = True
    learner_bf16: bool = False
    # The CNNs' weights and activations in NHWC layout, the tensor cores' own (no transposes).
    learner_channels_last: bool = False
    # A learner on a GPU keeps a copy of its replay there and draws its minibatches there
    # (rl/td3/device_replay.py); refused at the start if the GPU cannot hold it.
    learner_replay_on_gpu: bool = True
    cpus_per_env_runner: float = Field(default=1.0, gt=0.0)
    # Managed CARLA servers run inside their env runners: N servers share one GPU, so each
    # runner asks Ray for 1/N GPU (0: env runners need no GPU, e.g. the embedded env).
    carla_servers_per_gpu: int = Field(default=0, ge=0)
    # Ray custom resources each env runner (training and evaluation) asks for. On Kubernetes,
    # `{carla_server: 1}` with each CARLA pod advertising one puts one runner next to each
    # sidecar server (k8s/raycluster.yaml).
    custom_resources_per_env_runner: dict[str, Annotated[float, Field(gt=0.0)]] = Field(default_factory=dict)
    # A failed env runner (its env raised, its node was lost) is replaced, this many times at
    # most, after this delay; training goes on meanwhile with the others.
    max_env_runner_restarts: int = Field(default=100, ge=0)
    env_runner_restart_delay_s: float = Field(default=10.0, ge=0.0)
    # A training iteration waits this long at most for a runner's fragment (RLlib's
    # `sample_timeout_s`); a runner is stuck if it cannot answer within it: silent for
    # `health.stall_iters` iterations, it is alerted (`runner_silent`); at the run's end, killed.
    sample_timeout_s: float = Field(default=60.0, gt=0.0)
    # A call to the learners (updates, adding transitions, saving or loading the replay) that
    # has not returned within this is an error naming the learners that did not answer: a hung
    # learner (a stuck GPU, a lost node) ends the run instead of hanging it forever.
    learner_timeout_s: float = Field(default=600.0, gt=0.0)
    # Env runners keep sampling while the learner learns (rl/td3/td3.py): on a cluster, CARLA
    # servers and the GPU learner are both busy instead of taking turns. The replay ratio stays
    # exactly `algo.updates_per_env_step`; the price is policy lag (reported as `policy_lag`).
    async_sampling: bool = False
    # Asynchronous sampling: weights go to the runners once the learner has made this many
    # updates since the last time (1: after every learner call, the freshest weights).
    weights_sync_every_updates: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _async_needs_remote_runners(self) -> "ResourcesSection":
        if self.async_sampling and self.num_env_runners == 0:
            raise ValueError(
                "async_sampling: true needs num_env_runners >= 1 (with 0 the driver samples "
                "itself and cannot learn at the same time)"
            )
        return self


class EvaluationSection(Section):
    interval_iters: int = Field(default=20, ge=0, description="0 turns periodic evaluation off")
    episodes: int = Field(default=10, gt=0)
    # 0: evaluation envs live in the driver. N > 0: N remote evaluation env runners, placed like
    # the training ones (e.g. on a CARLA pod, where the driver's head pod has no server).
    num_env_runners: int = Field(default=0, ge=0)
    # One episode of the deterministic policy as a video (videos/<iteration>.gif and W&B) at each
    # evaluation and at the end: the camera frames the policy saw beside the env's own view, with
    # speed, action and reward terms drawn on (rl/episode_video.py). About 1 s per video on the
    # embedded env (benchmarks/README.md); off, it costs nothing.
    video: bool = False


class HealthSection(Section):
    """Training-health rules (callbacks/health.py): thresholds, and what a CRITICAL alert does.
    Why each default has its value: README, "Training health"."""

    stop_on_critical: bool = True
    # Q outside [r_min, r_max] / (1 - gamma) by more than this fraction of that range: CRITICAL.
    q_bound_slack: float = Field(default=0.5, ge=0.0)
    # Q1 at episode starts above the discounted return obtained from them, by more than this
    # many times the size of those returns, and more than the window before: WARN.
    overestimation_max: float = Field(default=0.5, gt=0.0)
    # |Q max| grew this many times within `window_iters` and passed half the bound: WARN.
    q_growth_factor: float = Field(default=10.0, gt=1.0)
    window_iters: int = Field(default=10, ge=2, description="iterations per trend window")
    # The last window's mean return lost more than (1 - this) of its best window since learning
    # started: WARN; CRITICAL when the episode length collapsed with it (callbacks/health.py).
    collapse_fraction: float = Field(default=0.5, gt=0.0, lt=1.0)
    # Returns since learning started, over the newest iterations holding at least
    # `min_window_episodes` episodes and `min_window_iters` iterations, below the uniform
    # warm-up's mean by more than `warmup_margin` of its per-episode spread and not climbing,
    # for `warmup_patience_iters` iterations: WARN; CRITICAL when episode lengths are below the
    # warm-up's by as much too.
    warmup_margin: float = Field(default=0.5, gt=0.0)
    min_window_episodes: int = Field(default=10, ge=1)
    min_window_iters: int = Field(default=3, ge=1)
    warmup_patience_iters: int = Field(default=12, ge=1)
    # Pre-clip gradient norm per unit of reward scale (mean |r| a step) above this many times
    # the group's reference limit, or this many times its own early level: WARN.
    grad_limit_factor: float = Field(default=100.0, gt=1.0)
    grad_growth_max: float = Field(default=100.0, gt=1.0)
    # Reference limit per gradient group for rewards of about 1 a step; a group left out uses
    # its `algo.grad_clip` limit, or the module-wise default (1 actor, 10 critic) when unclipped.
    grad_reference: dict[str, Annotated[float, Field(gt=0.0)]] = Field(default_factory=dict)
    # More than this share of the actor's outputs at the tanh bounds, over `window_iters`: WARN;
    # CRITICAL when its gradients fell below `dead_grad_ratio` of their early level as well.
    saturation_max: float = Field(default=0.95, gt=0.0, le=1.0)
    dead_grad_ratio: float = Field(default=0.01, gt=0.0, lt=1.0)
    # Warn at start when the effective horizon 1/(1-gamma) and the episode length differ by
    # more than this factor either way.
    horizon_ratio_max: float = Field(default=20.0, gt=1.0)
    # Warn at start when the target lag 1/tau times this exceeds the run's planned updates.
    target_lag_ratio: float = Field(default=10.0, gt=0.0)
    # Warn after the warm-up when rewards average more than this in size per step.
    reward_scale_max: float = Field(default=10.0, gt=0.0)
    # Must be reported every iteration once learning has started (the seed had no losses).
    required_metrics: list[str] = Field(
        default_factory=lambda: ["losses/critic", "losses/actor", "q/q1_mean", "q/q1_max"]
    )
    # Iterations after learning starts before a missing required metric is an alert.
    grace_iters: int = Field(default=2, ge=1)
    # This many iterations running without a new env step (every runner down or hung), or without
    # a fragment from one of the runners (`runner_silent`): WARN.
    stall_iters: int = Field(default=3, ge=1)
    # A condition absent this many iterations running has cleared (an INFO alert); until then a
    # return of it is the same alert, not a new one.
    clear_iters: int = Field(default=3, ge=1)

    @field_validator("grad_reference")
    @classmethod
    def _known_groups(cls, limits: dict) -> dict:
        unknown = sorted(set(limits) - set(DEFAULT_GRAD_CLIP))
        if unknown:
            raise ValueError(f"unknown gradient group(s) {unknown}; groups: {list(DEFAULT_GRAD_CLIP)}")
        return limits


class WandbSection(Section):
    """Weights & Biases. The API key comes from WANDB_API_KEY (or a Kubernetes Secret mounted
    as it), never from a file here; without a key, runs are written offline to the run directory
    (`wandb sync` uploads them later). A W&B failure never stops training."""

    enabled: bool = True
    project: str = Field(default="carla-td3", min_length=1)
    entity: str | None = None
    group: str | None = None
    tags: list[str] = Field(default_factory=list)
    mode: Literal["auto", "online", "offline"] = Field(
        default="auto",
        description="auto: WANDB_MODE if set, else online with a key (WANDB_API_KEY or WANDB_API_KEY_FILE), offline without",
    )
    # Online, W&B waits this long for its server; then the run is logged offline instead.
    init_timeout_s: float = Field(default=30.0, gt=0.0)
    # The checkpoint a run ends with (its final one, or the newest healthy one when it stopped
    # unhealthy or crashed) as a model artifact: weights, optimizers, counters; never the replay
    # buffer. About 4x the networks' size (Adam's moments, target networks).
    log_checkpoints: bool = True


class ExperimentConfig(Section):
    experiment: ExperimentSection
    env: EnvSection
    algo: AlgoSection = Field(default_factory=AlgoSection)
    model: ModelSection = Field(default_factory=ModelSection)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    health: HealthSection = Field(default_factory=HealthSection)
    wandb: WandbSection = Field(default_factory=WandbSection)

    @model_validator(mode="after")
    def _cross_checks(self) -> "ExperimentConfig":
        if self.algo.train_batch_size > self.algo.buffer_size:
            raise ValueError("algo.train_batch_size must not exceed algo.buffer_size")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# Sections keyed by gradient group (DEFAULT_GRAD_CLIP's names, which hold dots).
GROUP_KEYED_SECTIONS = {("algo", "grad_clip"), ("health", "grad_reference")}


def _apply_override(data: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. algo.gamma=0.95")
    dotted, raw = override.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {override!r}: {dotted!r} is not a dotted key")
    try:
        value = load_yaml(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {dotted}: value {raw!r} is not valid YAML ({yaml_problem(e)})") from None
    node, section = data, ()
    # The keys of some sections hold dots themselves (gradient groups: algo.grad_clip.critic.head):
    # there, the rest is one key, known or not (a misspelled group is then named as unknown).
    while len(parts) > 1 and section not in GROUP_KEYED_SECTIONS and ".".join(parts) not in node:
        section += (parts.pop(0),)
        node = node.setdefault(section[-1], {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(section)!r} is not a section")
    node[".".join(parts)] = value


def parse_config(data: Any, source: str = "<config>", overrides: list[str] = ()) -> ExperimentConfig:
    """Validates a plain dict (e.g. parsed YAML) plus `--set` overrides into an ExperimentConfig."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    for override in overrides:
        _apply_override(data, override)
    try:
        config = ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(source, e)) from None
    _validate_driving_env(config, source)
    return config


def _validate_driving_env(config: ExperimentConfig, source: str) -> None:
    """The driving envs' kwargs have a schema of their own (carla_env/config.py), and CARLA's
    server ports must not clash for the runners and envs asked for."""
    from carla_env import driving_env_schema
    from carla_env.config import CarlaEnvConfig
    from carla_env.ports import check_no_clashes

    schema = driving_env_schema(config.env.id)
    if schema is None:
        _check_env_takes_kwargs(config, source)
        return
    try:
        env = schema.model_validate(config.env.kwargs)
    except ValidationError as e:
        raise ConfigError(format_errors(source, e, "env.kwargs.", "carla_env/config.py")) from None
    if isinstance(env, CarlaEnvConfig) and env.server.mode == "managed":
        res, server = config.resources, env.server
        if server.slots_per_process < res.num_envs_per_env_runner + 1:
            raise ConfigError(
                f"{source}: env.kwargs.server.slots_per_process ({server.slots_per_process}) must be "
                f"at least resources.num_envs_per_env_runner + 1 (one more for the evaluation env)"
            )
        try:
            check_no_clashes((res.num_env_runners + 1) * server.slots_per_process, server)
        except ValueError as e:
            raise ConfigError(f"{source}: env.kwargs.server: {e}") from None


def env_creator(env_id: str):
    """The class or function a registered env id makes its env with (the id was checked at
    load, which imported its module)."""
    import gymnasium
    from gymnasium.envs.registration import load_env_creator

    entry_point = gymnasium.spec(env_id.rpartition(":")[2]).entry_point
    return load_env_creator(entry_point) if isinstance(entry_point, str) else entry_point


def _check_env_takes_kwargs(config: ExperimentConfig, source: str) -> None:
    """Envs without a schema of ours: the kwargs must be arguments the env's constructor takes
    (otherwise a TypeError comes from deep inside an env runner, after Ray started)."""
    import inspect

    if not config.env.kwargs:
        return
    creator = env_creator(config.env.id)
    try:
        parameters = inspect.signature(creator).parameters
    except (TypeError, ValueError):  # a builtin or C extension: nothing to check against
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(set(config.env.kwargs) - set(parameters))
    if unknown:
        raise ConfigError(
            f"{source}: env.kwargs: {config.env.id} takes no argument {', '.join(map(repr, unknown))}; "
            f"it takes {', '.join(parameters) or 'none'}"
        )


def load_config(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    path = Path(path)
    data = read_yaml_file(path, "config file")
    return parse_config(data, source=str(path), overrides=overrides)
