"""Typed configuration of the driving envs: the `env.kwargs` of an experiment YAML.

Both backends share the contract's settings (camera, state, reward, episode); each adds its own
(`EmbeddedEnvConfig`, `CarlaEnvConfig`). Validated at config load (rl/config.py), so a typo in
`env.kwargs.reward.colision` fails before Ray starts, and again when an env is built from a dict.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, ValidationError, field_validator, model_validator

from common.config import ConfigError, Section, format_errors

Metres = Annotated[float, Field(gt=0.0)]


class CameraSection(Section):
    """The `image` observation: the last `frame_stack` grayscale frames, channels first."""

    width: int = Field(default=84, ge=16, le=512)
    height: int = Field(default=84, ge=16, le=512)
    frame_stack: int = Field(default=4, ge=1, le=16)


class StateSection(Section):
    """The `state` observation (carla_env/contract.py `state_features`)."""

    target_speed_mps: float = Field(default=25.0, gt=0.0, description="speed that earns full progress")
    # Route points ahead, at these distances along the route, reported as lateral offsets in
    # the car's frame: they tell the policy where the road goes.
    lookahead_m: list[Metres] = Field(default_factory=lambda: [5.0, 10.0, 20.0], min_length=1)
    front_gap_range_m: float = Field(default=60.0, gt=0.0, description="gaps beyond this read as this")


class RewardSection(Section):
    """Magnitudes of the reward terms (carla_env/reward.py). Each term is bounded per step, so
    the per-step reward lies in [-(lane_centering + max(collision, off_route) + comfort), progress]
    (an episode pays the penalty of the reason it ended, once)."""

    progress: float = Field(default=1.0, gt=0.0, description="per step at or above target speed")
    lane_centering: float = Field(default=0.3, ge=0.0, description="per step at half a lane width off centre")
    collision: float = Field(default=10.0, ge=0.0, description="once, on the colliding step")
    off_route: float = Field(default=10.0, ge=0.0, description="once, on the step that leaves the road")
    comfort: float = Field(default=0.1, ge=0.0, description="per step, for a full-range steering swing")


class EpisodeSection(Section):
    """When episodes end: collision, off route or stuck terminate; the time limit truncates."""

    max_seconds: float = Field(default=40.0, gt=0.0)
    control_hz: float = Field(default=5.0, gt=0.0, description="policy steps per simulated second")
    stuck_speed_mps: float = Field(default=0.5, ge=0.0)
    stuck_seconds: float = Field(default=5.0, gt=0.0, description="below stuck_speed this long: stuck")

    @property
    def max_steps(self) -> int:
        return max(1, round(self.max_seconds * self.control_hz))


class DrivingEnvConfig(Section):
    camera: CameraSection = Field(default_factory=CameraSection)
    state: StateSection = Field(default_factory=StateSection)
    reward: RewardSection = Field(default_factory=RewardSection)
    episode: EpisodeSection = Field(default_factory=EpisodeSection)
    npc_vehicles: int = Field(default=20, ge=0, description="traffic around the ego car")
    simulation_hz: float = Field(default=10.0, gt=0.0, description="physics steps per simulated second")

    @model_validator(mode="after")
    def _whole_physics_steps(self) -> "DrivingEnvConfig":
        ratio = self.simulation_hz / self.episode.control_hz
        if ratio < 1 or abs(ratio - round(ratio)) > 1e-9:
            raise ValueError(
                f"simulation_hz ({self.simulation_hz}) must be a whole multiple of "
                f"episode.control_hz ({self.episode.control_hz})"
            )
        return self

    @property
    def physics_steps_per_control_step(self) -> int:
        return round(self.simulation_hz / self.episode.control_hz)


class HighwayEnvConfig(DrivingEnvConfig):
    """What both embedded scenarios (highway-env worlds, no server) share."""

    # Camera: a top-down view; 2 pixels per metre shows 42 m of road across 84 pixels.
    pixels_per_metre: float = Field(default=2.0, gt=0.0)
    # highway-env's kinematic car turns its wheels instantly: a small range keeps a random
    # policy on the road for a few seconds, like a real car at highway speed.
    max_steer_deg: float = Field(default=10.0, gt=0.0, le=45.0)


class EmbeddedEnvConfig(HighwayEnvConfig):
    """The embedded default: highway-env's multi-lane highway."""

    lanes: int = Field(default=3, ge=1, le=8)


class EmbeddedTownConfig(HighwayEnvConfig):
    """The embedded town (carla_env/town.py): a grid of two-way streets, routes through junctions.
    Defaults: town speeds (streets at 10 m/s), 90 s for a route of up to 450 m."""

    state: StateSection = Field(
        default_factory=lambda: StateSection(target_speed_mps=8.0, lookahead_m=[4.0, 8.0, 16.0], front_gap_range_m=30.0)
    )
    episode: EpisodeSection = Field(default_factory=lambda: EpisodeSection(max_seconds=90.0))
    npc_vehicles: int = Field(default=12, ge=0, description="traffic on the town's streets")
    # A 90-degree turn of radius 7 m needs ~35 degrees of wheel angle on highway-env's 5 m car.
    max_steer_deg: float = Field(default=40.0, gt=0.0, le=60.0)
    # Tyre grip: steering is limited to what this lateral acceleration allows at the car's speed
    # (8 m/s^2, about 0.8 g, a road car's limit): 10 m/s takes a 12.5 m bend, 20 m/s needs 50 m.
    max_lateral_accel_mps2: float = Field(default=8.0, gt=0.0)
    grid: int = Field(default=3, ge=3, le=6, description="junctions per side: 3 gives a 4-way, 4 Ts, 4 bends")
    block_m: float = Field(default=80.0, ge=40.0, description="junction centre to junction centre")
    lane_width_m: float = Field(default=4.0, gt=2.0)
    junction_half_m: float = Field(default=9.0, gt=0.0, description="junction centre to its stop line")
    bend_half_m: float = Field(default=16.0, gt=0.0, description="a bend's centre to where it starts")
    speed_limit_mps: float = Field(default=10.0, gt=0.0, description="what NPC cars drive at")
    start_speed_mps: float = Field(default=5.0, ge=0.0)
    route_min_m: float = Field(default=200.0, gt=0.0)
    route_max_m: float = Field(default=450.0, gt=0.0)
    route_min_turns: int = Field(default=2, ge=0, description="left or right turns at junctions (not bends)")
    max_route_deviation_m: float = Field(default=6.0, gt=0.0, description="farther from the route: off route")

    @model_validator(mode="after")
    def _fits(self) -> "EmbeddedTownConfig":
        longest = max(self.junction_half_m, self.bend_half_m)
        if 2 * longest + 10.0 > self.block_m:
            raise ValueError(
                f"block_m ({self.block_m:g}) leaves no street between junctions: it must exceed "
                f"2 x max(junction_half_m, bend_half_m) + 10 = {2 * longest + 10:g}"
            )
        if self.junction_half_m <= self.lane_width_m / 2 + 1.0:
            raise ValueError(f"junction_half_m ({self.junction_half_m:g}) must exceed lane_width_m / 2 + 1")
        if self.route_min_m > self.route_max_m:
            raise ValueError(f"route_min_m ({self.route_min_m:g}) exceeds route_max_m ({self.route_max_m:g})")
        return self


# Maps shipped with CARLA 0.9.16 (the "Opt" variants are the same towns with layers).
CARLA_TOWNS = (
    "Town01", "Town02", "Town03", "Town04", "Town05", "Town06", "Town07",
    "Town10HD", "Town11", "Town12", "Town13", "Town15",
)
# carla.WeatherParameters presets.
CARLA_WEATHERS = (
    "Default", "ClearNoon", "CloudyNoon", "WetNoon", "WetCloudyNoon", "MidRainyNoon",
    "HardRainNoon", "SoftRainNoon", "ClearSunset", "CloudySunset", "WetSunset",
    "WetCloudySunset", "MidRainSunset", "HardRainSunset", "SoftRainSunset", "ClearNight",
    "CloudyNight", "WetNight", "WetCloudyNight", "SoftRainNight", "MidRainyNight",
    "HardRainNight", "DustStorm",
)
Endpoint = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+:[0-9]{1,5}$")]


class ServerSection(Section):
    """Where the CARLA servers come from (carla_env/servers.py).

    managed: each env launches its own `CarlaUE4.sh` on ports derived from its env runner and
        slot (carla_env/ports.py), on a GPU (`gpus`), and restarts it when it dies or hangs.
    external: servers already running (Kubernetes sidecars, your own), one `host:port` per env;
        a dead one is waited for and reconnected to, not restarted.
    """

    mode: Literal["managed", "external"] = "managed"
    external: list[Endpoint] = Field(default_factory=list)
    # Who shares the `external` list: "cluster" (remote servers, each used by one env of the
    # job) or "node" (sidecars: every Ray node has its own servers at these local addresses).
    external_scope: Literal["cluster", "node"] = "cluster"
    carla_root: str | None = Field(default=None, description="default: the CARLA_ROOT variable")
    base_rpc_port: int = Field(default=2000, ge=1024, le=65000)
    port_stride: int = Field(default=4, ge=3, description="rpc, streaming (+1), secondary (+2)")
    base_tm_port: int = Field(default=8000, ge=1024, le=65000)
    slots_per_process: int = Field(default=4, ge=1, description="CARLA envs one process may hold")
    # Ports another run holds (a second job or Tune trial on the node) move this run's server
    # up by whole blocks: block k adds k * run_port_block to every port of the plan.
    run_port_block: int = Field(default=200, ge=8)
    max_port_blocks: int = Field(default=8, ge=1)
    # "ray": the GPU Ray gave the env runner (resources.carla_servers_per_gpu > 0), found among
    # Vulkan's adapters by PCI bus; none given: adapter 0. A list: adapters by slot, round robin.
    gpus: Literal["ray"] | list[Annotated[int, Field(ge=0)]] = "ray"
    quality_level: Literal["Low", "Epic"] = "Low"
    log_dir: str = Field(default="/tmp/carla-server-logs", min_length=1, description="one log per server port")
    log_max_mb: float = Field(default=50.0, gt=0.0, description="per server log; one older file is kept")
    startup_timeout_s: float = Field(default=120.0, gt=0.0)
    connect_timeout_s: float = Field(default=120.0, gt=0.0, description="connecting and load_world")
    tick_timeout_s: float = Field(default=10.0, gt=0.0, description="every other client call, ticks too")
    probe_timeout_s: float = Field(default=10.0, gt=0.0, description="a game-thread call that says the server lives")
    client_worker_threads: int = Field(default=2, ge=1, description="the CARLA client's streaming threads")
    max_restarts: int = Field(default=5, ge=0, description="per env, before the error is raised")
    owner_check_s: float = Field(default=1.0, gt=0.0, description="managed: how often a server's watchdog checks that its env lives")
    restart_every_episodes: int = Field(default=0, ge=0, description="managed: fresh server every N episodes (leaks); 0 never; external: ignored")

    @model_validator(mode="after")
    def _external_needs_endpoints(self) -> "ServerSection":
        if self.mode == "external" and not self.external:
            raise ValueError("mode 'external' needs at least one host:port in `external`")
        return self


class CarlaEnvConfig(DrivingEnvConfig):
    """A real CARLA 0.9.16 server, synchronous mode."""

    town: str = "Town03"
    weather: str = "ClearNoon"
    walkers: int = Field(default=0, ge=0)
    # CARLA's physics substeps cover at most 0.1 s (max_substeps 10 x 0.01 s): "Do not use a
    # time-step greater than 0.1s" (Docs/adv_synchrony_timestep.md).
    simulation_hz: float = Field(default=20.0, ge=10.0, description="1 / fixed_delta_seconds, at most 0.1 s")
    camera_fov_deg: float = Field(default=90.0, gt=0.0, lt=180.0)
    route_length_m: float = Field(default=500.0, gt=0.0)
    max_route_deviation_m: float = Field(default=3.0, gt=0.0, description="farther: off route")
    server: ServerSection = Field(default_factory=ServerSection)

    @field_validator("town")
    @classmethod
    def _known_town(cls, town: str) -> str:
        if town.removesuffix("_Opt") not in CARLA_TOWNS:
            raise ValueError(f"unknown town {town!r}; CARLA 0.9.16 maps: {', '.join(CARLA_TOWNS)}")
        return town

    @field_validator("weather")
    @classmethod
    def _known_weather(cls, weather: str) -> str:
        if weather not in CARLA_WEATHERS:
            raise ValueError(f"unknown weather preset {weather!r}; presets: {', '.join(CARLA_WEATHERS)}")
        return weather


ConfigT = TypeVar("ConfigT", bound=DrivingEnvConfig)


def load_env_config(cls: type[ConfigT], kwargs: dict[str, Any]) -> ConfigT:
    """Validates an env's kwargs; errors name the key as the experiment YAML spells it."""
    try:
        return cls.model_validate(kwargs)
    except ValidationError as e:
        raise ConfigError(format_errors(cls.__name__, e, "env.kwargs.", "carla_env/config.py")) from None
