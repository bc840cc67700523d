"""The CARLA backend (carla 0.9.16 client): a synchronous-mode world measured for the contract.

One `CarlaSimulator` drives one server. Per episode it spawns the ego car (a map spawn point),
`npc_vehicles` cars on Traffic Manager autopilot and `walkers` pedestrians, an RGB camera and
collision and lane-invasion sensors, and plans a route along the map's waypoints. Every tick
is the server's (`world.tick()` in synchronous mode, `fixed_delta_seconds = 1/simulation_hz`),
and every sensor reading is matched to the frame it belongs to: a camera image that does not
arrive for this frame within `tick_timeout_s` is a failure, never an older image.

Everything spawned is destroyed at the next reset and at close, also after an exception. When
the server crashes or hangs, the server handle (carla_env/servers.py) restarts or waits for it,
the client reconnects, and the lost episode ends as truncated (SimulatorInterrupted).
"""

from __future__ import annotations

import importlib
import math
import queue
import time
from typing import Any

import numpy as np

from carla_env.config import CarlaEnvConfig
from carla_env.contract import STEER, THROTTLE_BRAKE, Measurements, car_axes, wrap_angle
from carla_env.driving_env import SimulatorInterrupted
from carla_env.servers import ServerError

ROUTE_SPACING_M = 2.0
CAMERA_MOUNT = {"x": 1.5, "z": 2.4}  # above the windscreen, metres from the car's origin
NPC_LENGTH_M = 4.5  # gaps are measured bumper to bumper, approximately
BGR_TO_GRAY = np.array([0.114, 0.587, 0.299])  # CARLA images are BGRA


def import_carla():
    try:
        return importlib.import_module("carla")
    except ImportError:
        raise ImportError(
            "the CARLA backend needs the CARLA client: pip install 'carla==0.9.16' "
            "(or pip install -e '.[carla]')"
        ) from None


def _xy(location) -> np.ndarray:
    return np.array([location.x, location.y])


class CarlaSimulator:
    def __init__(self, config: CarlaEnvConfig, server, tm_port: int, carla_module=None):
        self.config, self.server, self.tm_port = config, server, tm_port
        self.carla = carla_module or import_carla()
        self._rng = np.random.default_rng()
        self._actor_ids: list[int] = []  # vehicles and walkers, destroyed in one batch
        self._sensors: list[Any] = []
        self._controllers: list[Any] = []
        self._stats = {"ticks": 0, "tick_timeouts": 0, "sensor_timeouts": 0, "lane_invasions": 0}
        self._sim_seconds = self._wall_seconds = 0.0
        self._connect()

    # --- Connection ---------------------------------------------------------------------

    def _connect(self) -> None:
        carla, cfg = self.carla, self.config
        self.client = carla.Client(self.server.host, self.server.rpc_port)
        self.client.set_timeout(cfg.server.tick_timeout_s)
        maps = {m.rsplit("/", 1)[-1] for m in self.client.get_available_maps()}
        if cfg.town not in maps:
            raise ServerError(
                f"town {cfg.town!r} is not on the server {self.server.host}:{self.server.rpc_port}; "
                f"it has: {', '.join(sorted(maps))}"
            )
        world = self.client.get_world()
        if world.get_map().name.rsplit("/", 1)[-1] != cfg.town:
            world = self.client.load_world(cfg.town)
        self.world, self.map = world, world.get_map()
        settings = world.get_settings()
        settings.synchronous_mode = True
        settings.fixed_delta_seconds = 1.0 / cfg.simulation_hz
        world.apply_settings(settings)
        world.set_weather(getattr(carla.WeatherParameters, cfg.weather))
        self.traffic_manager = self.client.get_trafficmanager(self.tm_port)
        self.traffic_manager.set_synchronous_mode(True)

    def _recover(self) -> None:
        """The server failed: forget its actors (gone with it, or destroyed if it lives),
        restart or wait for it, reconnect."""
        try:
            self._destroy_actors()
        except RuntimeError:
            self._actor_ids, self._sensors, self._controllers = [], [], []
        self.server.recover()
        self._connect()

    # --- Episode ------------------------------------------------------------------------

    def reset(self, seed: int | None) -> tuple[np.ndarray, Measurements]:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
            self.traffic_manager.set_random_device_seed(seed)
        try:
            return self._start_episode()
        except SimulatorInterrupted:
            return self._start_episode()  # the server was recovered: one more try

    def _start_episode(self) -> tuple[np.ndarray, Measurements]:
        self._destroy_actors()
        self._spawn_ego()
        self._spawn_npcs()
        self._spawn_walkers()
        self._attach_sensors()
        self._route = self._plan_route(self.map.get_waypoint(self.ego.get_transform().location))
        self._route_index = 0
        frame = self._tick()
        return self._camera_frame(frame), self._measure(frame)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, Measurements]:
        throttle_brake = float(action[THROTTLE_BRAKE])
        self.ego.apply_control(
            self.carla.VehicleControl(
                steer=float(action[STEER]),
                throttle=max(throttle_brake, 0.0),
                brake=max(-throttle_brake, 0.0),
            )
        )
        start_frame = self._frame
        for _ in range(self.config.physics_steps_per_control_step):
            frame = self._tick()
        return self._camera_frame(frame), self._measure(frame, since=start_frame)

    def health(self) -> dict[str, float]:
        wall = self._wall_seconds
        return {
            **self._stats,
            "server_restarts": self.server.restarts,
            "sim_fps": self._stats["ticks"] / wall if wall else 0.0,  # ticks per wall second
            "sim_speedup": self._sim_seconds / wall if wall else 0.0,  # sim s per wall s
        }

    def close(self) -> None:
        try:
            self._destroy_actors()
            settings = self.world.get_settings()
            settings.synchronous_mode = False  # leave a shared server running freely
            self.world.apply_settings(settings)
            self.traffic_manager.set_synchronous_mode(False)
        finally:
            self.server.stop()

    # --- Spawning and cleanup -----------------------------------------------------------

    def _spawn_ego(self) -> None:
        blueprint = self.world.get_blueprint_library().find("vehicle.tesla.model3")
        blueprint.set_attribute("role_name", "hero")
        points = self.map.get_spawn_points()
        for i in self._rng.permutation(len(points)):
            self.ego = self.world.try_spawn_actor(blueprint, points[i])
            if self.ego is not None:
                self._actor_ids.append(self.ego.id)
                self._ego_spawn_index = i
                return
        raise RuntimeError(f"no free spawn point for the ego car in {self.config.town}")

    def _spawn_npcs(self) -> None:
        command = self.carla.command
        blueprints = [
            bp for bp in self.world.get_blueprint_library().filter("vehicle.*")
            if int(bp.get_attribute("number_of_wheels")) == 4
        ]
        points = self.map.get_spawn_points()
        free = [i for i in self._rng.permutation(len(points)) if i != self._ego_spawn_index]
        chosen = free[: self.config.npc_vehicles]
        batch = [
            command.SpawnActor(blueprints[self._rng.integers(len(blueprints))], points[i]).then(
                command.SetAutopilot(command.FutureActor, True, self.tm_port)
            )
            for i in chosen
        ]
        self._npc_ids = self._apply_spawn_batch(batch)

    def _spawn_walkers(self) -> None:
        if not self.config.walkers:
            return
        command, library = self.carla.command, self.world.get_blueprint_library()
        walker_bps = library.filter("walker.pedestrian.*")
        places = [self.world.get_random_location_from_navigation() for _ in range(self.config.walkers)]
        walkers = self._apply_spawn_batch(
            [
                command.SpawnActor(walker_bps[self._rng.integers(len(walker_bps))], self.carla.Transform(p))
                for p in places if p is not None
            ]
        )
        controller_bp = library.find("controller.ai.walker")
        controllers = self._apply_spawn_batch(
            [command.SpawnActor(controller_bp, self.carla.Transform(), w) for w in walkers]
        )
        self._controllers = list(self.world.get_actors(controllers))
        self.world.tick()  # controllers need one tick before they take orders
        for controller in self._controllers:
            controller.start()
            controller.go_to_location(self.world.get_random_location_from_navigation())

    def _apply_spawn_batch(self, batch: list) -> list[int]:
        ids = []
        for response in self.client.apply_batch_sync(batch, False):
            if not response.error:  # an occupied spawn point: one car fewer, not a failure
                ids.append(response.actor_id)
        self._actor_ids.extend(ids)
        return ids

    def _attach_sensors(self) -> None:
        carla, cam = self.carla, self.config.camera
        library = self.world.get_blueprint_library()
        camera_bp = library.find("sensor.camera.rgb")
        camera_bp.set_attribute("image_size_x", str(cam.width))
        camera_bp.set_attribute("image_size_y", str(cam.height))
        camera_bp.set_attribute("fov", str(self.config.camera_fov_deg))
        mount = carla.Transform(carla.Location(**CAMERA_MOUNT))
        self._camera_queue: queue.Queue = queue.Queue()
        self._collision_frames: list[int] = []
        for blueprint, transform, callback in (
            (camera_bp, mount, self._camera_queue.put),
            (library.find("sensor.other.collision"), carla.Transform(), lambda e: self._collision_frames.append(e.frame)),
            (library.find("sensor.other.lane_invasion"), carla.Transform(), self._on_lane_invasion),
        ):
            sensor = self.world.spawn_actor(blueprint, transform, attach_to=self.ego)
            self._sensors.append(sensor)
            sensor.listen(callback)

    def _on_lane_invasion(self, event) -> None:
        self._stats["lane_invasions"] += 1

    def _destroy_actors(self) -> None:
        """Sensors first (stop their callbacks), then controllers, then cars and walkers in one
        batch; the lists are emptied even if the server refuses, so nothing is destroyed twice."""
        sensors, controllers, ids = self._sensors, self._controllers, self._actor_ids
        self._sensors, self._controllers, self._actor_ids = [], [], []
        try:
            for sensor in sensors:
                if sensor.is_listening:
                    sensor.stop()
            for controller in controllers:
                controller.stop()
        finally:
            command = self.carla.command
            others = [s.id for s in sensors] + [c.id for c in controllers] + ids
            if others:
                self.client.apply_batch_sync([command.DestroyActor(i) for i in others], False)

    # --- Ticking and sensors ------------------------------------------------------------

    def _tick(self) -> int:
        start = time.perf_counter()
        try:
            self._frame = self.world.tick()
        except RuntimeError as e:  # the client's timeout, or the connection is gone
            self._stats["tick_timeouts"] += 1
            self._recover()
            raise SimulatorInterrupted(f"tick failed ({e}); server recovered") from e
        self._wall_seconds += time.perf_counter() - start
        self._sim_seconds += 1.0 / self.config.simulation_hz
        self._stats["ticks"] += 1
        return self._frame

    def _camera_frame(self, frame: int) -> np.ndarray:
        """The camera image of exactly this world frame, as uint8 grayscale (height, width)."""
        timeout = self.config.server.tick_timeout_s
        while True:
            try:
                image = self._camera_queue.get(timeout=timeout)
            except queue.Empty:
                self._stats["sensor_timeouts"] += 1
                self._recover()
                raise SimulatorInterrupted(
                    f"no camera image for frame {frame} within {timeout:g} s; server recovered"
                ) from None
            if image.frame == frame:
                break
            # An image of an earlier frame (late delivery) is skipped, never used.
        bgra = np.frombuffer(image.raw_data, dtype=np.uint8).reshape(image.height, image.width, 4)
        return np.rint(bgra[:, :, :3] @ BGR_TO_GRAY).clip(0, 255).astype(np.uint8)

    # --- Route and measurements ---------------------------------------------------------

    def _plan_route(self, start) -> list:
        """Waypoints every ROUTE_SPACING_M from `start`, random turns at junctions."""
        route = [start]
        for _ in range(int(self.config.route_length_m / ROUTE_SPACING_M)):
            options = route[-1].next(ROUTE_SPACING_M)
            if not options:
                break
            route.append(options[self._rng.integers(len(options))])
        return route

    def _measure(self, frame: int, since: int | None = None) -> Measurements:
        transform = self.ego.get_transform()
        position, (forward, right) = _xy(transform.location), car_axes(math.radians(transform.rotation.yaw))
        v = self.ego.get_velocity()

        # Progress along the route: the nearest waypoint at or after the last one reached.
        window = self._route[self._route_index : self._route_index + 50]
        distances = [np.linalg.norm(_xy(w.transform.location) - position) for w in window]
        self._route_index += int(np.argmin(distances))
        if len(self._route) - self._route_index < 50:  # keep the route ahead long enough
            self._route += self._plan_route(self._route[-1])[1:]
        waypoint = self._route[self._route_index]
        _, wp_right = car_axes(math.radians(waypoint.transform.rotation.yaw))
        lateral = float(np.dot(position - _xy(waypoint.transform.location), wp_right))

        ahead = []
        for d in self.config.state.lookahead_m:
            point = self._route[min(self._route_index + round(d / ROUTE_SPACING_M), len(self._route) - 1)]
            ahead.append(float(np.dot(_xy(point.transform.location) - position, right)))

        gap = math.inf
        for npc in self.world.get_actors(self._npc_ids):
            offset = _xy(npc.get_transform().location) - position
            along = float(np.dot(offset, forward))
            if along > 0 and abs(np.dot(offset, right)) < waypoint.lane_width / 2:
                gap = min(gap, max(0.0, along - NPC_LENGTH_M))

        first_new = frame if since is None else since + 1
        collided = any(first_new <= f <= frame for f in self._collision_frames)
        return Measurements(
            speed_mps=math.sqrt(v.x**2 + v.y**2 + v.z**2),
            lateral_offset_m=lateral,
            heading_error_rad=wrap_angle(math.radians(transform.rotation.yaw - waypoint.transform.rotation.yaw)),
            lane_width_m=float(waypoint.lane_width),
            lookahead_lateral_m=tuple(ahead),
            front_gap_m=gap,
            collided=collided,
            on_route=abs(lateral) <= self.config.max_route_deviation_m,
        )
