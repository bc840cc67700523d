"""The CARLA backend (carla 0.9.16 client): a synchronous-mode world measured for the contract.

One `CarlaSimulator` drives one server. Per episode it spawns the ego car (a map spawn point),
`npc_vehicles` cars on Traffic Manager autopilot and `walkers` pedestrians, an RGB camera and a
collision sensor, and plans a route through the map's lanes and junctions from the ego's spawn
point to a destination (`RoutePlanner`); its end ends the episode ("route_complete"). Every
tick is the server's (`world.tick()` in synchronous mode, `fixed_delta_seconds = 1/simulation_hz`),
and every sensor reading is matched to the frame it belongs to: a camera image that does not
arrive for this frame within `tick_timeout_s` is a failure, never an older image (a missed image of
the optional chase view is no view for that step).

A failed call to the server (a tick or camera timeout, a dropped connection, an error while
connecting) raises `ServerLost`; this class never reconnects by itself. The CARLA client keeps
process-wide state bound to the first server it met (the Traffic Manager of a port, whose own
thread aborts the process when that server is gone: carla#4577, #6748), so a new connection
needs a new process: carla_env/client_process.py runs this class in one, and
carla_env/supervised.py replaces process and server after a loss.

Everything spawned is destroyed at the next reset and at close, also after an exception.
Real CARLA semantics this code relies on, with their evidence, are in carla_env/README.md.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import defaultdict
from typing import Any, NamedTuple

import numpy as np

from carla_env.config import CarlaEnvConfig
from carla_env.contract import STEER, THROTTLE_BRAKE, Measurements, car_axes
from carla_env.route import Route, path_to, shortest_paths
from carla_env.servers import ServerError, ServerLost, import_carla

ROUTE_SPACING_M = 2.0
CAMERA_MOUNT = {"x": 1.5, "z": 2.4}  # above the windscreen, metres from the car's origin
# The chase view for people (episode videos, `view()`): behind and above the car, looking a
# little down, like the third-person camera of CARLA's manual_control.py. Only envs made to
# render (evaluation, with videos on) spawn it: it costs the server a second render per tick.
VIEW_MOUNT = {"x": -5.5, "z": 2.8}
VIEW_PITCH_DEG = -10.0
VIEW_SIZE = (480, 270)  # width, height
FIRST_IMAGE_TICKS = 3  # a new camera's first images may not come (rendering warming up)
FIRST_IMAGE_WAIT_S = 1.0  # for each of them, before the next tick
VIEW_WAIT_S = 1.0  # for the chase view's image, once the camera's of the same frame has come
NPC_LENGTH_M = 4.5  # gaps are measured bumper to bumper, approximately
BGR_TO_GRAY = np.array([0.114, 0.587, 0.299])  # CARLA images are BGRA
# The ego car is CARLA's "hero": large maps (Town12, Town13, Town15) load their tiles around it.
# manual_control and the leaderboard name their cars so too, so a hero is ours only if it
# carries our sensors. Every other actor we spawn carries `role` (OUR_ROLE and the run's id).
EGO_ROLE = "hero"
OUR_ROLE = "carla_td3"


def _xy(location) -> np.ndarray:
    return np.array([location.x, location.y])


def _lane(waypoint) -> tuple[int, int, int]:
    return waypoint.road_id, waypoint.section_id, waypoint.lane_id


def _node(waypoint) -> tuple[int, int, int]:
    # Rounded to the metre, as GlobalRoutePlanner does: one lane's end and the next one's start
    # are the same place, but not to the last float digit.
    location = waypoint.transform.location
    return round(location.x), round(location.y), round(location.z)


def _collision_kind(type_id: str) -> str:
    """What a collision hit, as the leaderboard penalizes it (carla_env/driving_score.py)."""
    if type_id.startswith("vehicle."):
        return "vehicle"
    if type_id.startswith("walker."):
        return "pedestrian"
    return "static"  # props, and the world's geometry: "static.building", "static.pole", ...


class _Lane(NamedTuple):
    waypoints: list  # from the lane's start, every spacing, short of its end by half a spacing or more
    exit: Any  # the waypoint where it ends (the next lane's first)
    length_m: float
    exit_node: tuple[int, int, int]


class RoutePlanner:
    """Shortest routes through a map's lanes, as CARLA's GlobalRoutePlanner plans them
    (agents/navigation/global_route_planner.py, which the pip wheel does not ship).

    The map's topology is a list of lanes (one lane of one road section: its entry waypoint and
    the start of each lane it leads to). The graph's nodes are lane ends; each lane, sampled every
    `spacing_m` with `Waypoint.next`, is an edge as long as it is. Lane changes are no edges: a
    route keeps to the lanes it is on, as the Traffic Manager's cars do between junctions.
    """

    def __init__(self, carla_map, spacing_m: float):
        self.spacing = spacing_m
        self._lanes: dict[tuple, _Lane] = {}  # by (road_id, section_id, lane_id)
        self._leaving: dict[tuple, list] = defaultdict(list)  # node -> the lanes that start there
        topology = carla_map.get_topology()
        for entry, exit_ in topology:
            if _lane(entry) not in self._lanes:  # a lane into a junction: a pair per lane it leads to
                self._add(entry, exit_)
        # The 0.9.16 client leaves some dead ends out of the topology (lanes driven along their
        # road's reference line: on OpenDRIVE roads of 40 m and 100 m, not on one of 37.3 m):
        # each is added from where a lane leads into it, as GlobalRoutePlanner._find_loose_ends does.
        for _, exit_ in topology:
            if _lane(exit_) not in self._lanes:
                self._add(exit_, None)

    def plan(self, start, min_length_m: float, rng: np.random.Generator) -> list:
        """Waypoints about `spacing_m` apart from `start` to a destination (a lane's end), on the
        shortest path (Dijkstra) there. The destination is drawn from those at least
        `min_length_m` away; with none that far, it is the farthest."""
        if _lane(start) not in self._lanes:  # a dead end left out, with no lane leading into it
            return self._walk(start)
        exit_, exit_node = self._lanes[_lane(start)].exit, self._lanes[_lane(start)].exit_node
        first = self._walk(start, exit_)
        distance, came_by = shortest_paths(exit_node, self._length(start, first, exit_), lambda node: (
            (key, self._lanes[key].exit_node, self._lanes[key].length_m) for key in self._leaving[node]))
        far = [node for node, d in distance.items() if d >= min_length_m]
        node = far[int(rng.integers(len(far)))] if far else max(distance, key=distance.get)
        lanes = path_to(came_by, node)
        route = first + [w for key in lanes for w in self._lanes[key].waypoints]
        return route + [self._lanes[lanes[-1] if lanes else _lane(start)].exit]

    def _add(self, entry, exit_) -> None:
        waypoints = self._walk(entry, exit_)
        if exit_ is None:  # a dead end: its last waypoint
            exit_ = waypoints.pop()
        self._lanes[_lane(entry)] = _Lane(waypoints, exit_, self._length(entry, waypoints, exit_), _node(exit_))
        self._leaving[_node(entry)].append(_lane(entry))

    def _walk(self, start, exit_=None) -> list:
        """Waypoints every `spacing_m` along `start`'s lane from `start` on: up to the lane's end,
        or, with its exit given, those farther than half a spacing from it (the next lane's first
        waypoint is there)."""
        waypoints, here = [], start
        end = None if exit_ is None else _xy(exit_.transform.location)
        while end is None or np.linalg.norm(_xy(here.transform.location) - end) > self.spacing / 2:
            waypoints.append(here)
            ahead = [w for w in here.next(self.spacing) if _lane(w) == _lane(start)]
            if not ahead:
                break
            here = ahead[0]
        return waypoints

    @staticmethod
    def _length(start, waypoints: list, exit_) -> float:
        points = np.array([_xy(w.transform.location) for w in [start, *waypoints, exit_]])
        return float(np.linalg.norm(np.diff(points, axis=0), axis=1).sum())


class CarlaSimulator:
    def __init__(self, config: CarlaEnvConfig, host: str, rpc_port: int, tm_port: int, carla_module=None,
                 view: bool = False, role: str = OUR_ROLE):
        """`view`: also spawn the chase camera, for `view()`. `role`: the role name of our actors
        but the ego, the same for every client of this run (each cleans up after dead ones)."""
        self.config, self.host, self.rpc_port, self.tm_port = config, host, rpc_port, tm_port
        self.role = role
        self._with_view, self._view = view, None
        self.carla = carla_module or import_carla()
        self._rng = np.random.default_rng()
        self._actor_ids: list[int] = []  # vehicles and walkers, destroyed in one batch
        self._sensors: list[Any] = []
        self._controllers: list[Any] = []
        self._ticks, self._sim_seconds, self._wall_seconds = 0, 0.0, 0.0
        self._lost("connect_failures", self._connect)

    # --- Connection ---------------------------------------------------------------------

    def _connect(self) -> None:
        carla, cfg, server = self.carla, self.config, self.config.server
        # The client's own threads: by default one per host CPU, not per pod CPU.
        self.client = carla.Client(self.host, self.rpc_port, server.client_worker_threads)
        # Connecting and loading a map can take a minute on a cold server.
        self.client.set_timeout(float(server.connect_timeout_s))
        maps = {m.rsplit("/", 1)[-1] for m in self.client.get_available_maps()}
        if cfg.town not in maps:
            raise ServerError(
                f"town {cfg.town!r} is not on the server {self.host}:{self.rpc_port}; "
                f"it has: {', '.join(sorted(maps))}"
            )
        world = self.client.get_world()
        if world.get_map().name.rsplit("/", 1)[-1] != cfg.town:
            world = self.client.load_world(cfg.town)  # resets the settings: apply them after
        # Every other call is bounded by tick_timeout_s. A tick's too: `world.tick(seconds)` sends
        # its tick cue as an RPC under the client's timeout (LibCarla Simulator::Tick), and
        # `seconds` bounds only the wait for the frame. With connect_timeout_s (120 s) a lost
        # server was found only by the client process's backstop, a minute later.
        self.client.set_timeout(float(server.tick_timeout_s))
        self.world, self.map = world, world.get_map()
        self._planner = RoutePlanner(self.map, ROUTE_SPACING_M)
        self._destroy_leftovers()
        settings = world.get_settings()
        settings.synchronous_mode = True
        settings.fixed_delta_seconds = 1.0 / cfg.simulation_hz
        world.apply_settings(settings)
        world.set_weather(getattr(carla.WeatherParameters, cfg.weather))
        self.traffic_manager = self.client.get_trafficmanager(self.tm_port)
        self.traffic_manager.set_synchronous_mode(True)  # after the world's (CARLA's docs)
        self._frame = world.get_snapshot().frame

    def _destroy_leftovers(self) -> None:
        """Actors a previous client of this run left on this server (it died without cleaning
        up: a shared server lives on): those with our role, and the cars our sensors ride on.
        Someone else's hero (manual_control, the leaderboard) or another run's actors stay."""
        tagged = [a for a in self.world.get_actors() if str(a.attributes.get("role_name", "")) == self.role]
        ours = {a.id for a in tagged} | {a.parent.id for a in tagged if a.parent is not None}
        if ours:
            self.client.apply_batch_sync([self.carla.command.DestroyActor(int(i)) for i in ours], False)

    def _lost(self, counter: str, call, *args):
        """Runs a call to the server; a client error (timeout, connection) means the server is lost."""
        try:
            return call(*args)
        except (ServerError, ServerLost):
            raise
        except RuntimeError as e:
            raise ServerLost(counter, str(e)) from e

    # --- Episode ------------------------------------------------------------------------

    def reset(self, seed: int | None) -> tuple[np.ndarray, Measurements]:
        return self._lost("reset_failures", self._start_episode, seed)

    def _start_episode(self, seed: int | None) -> tuple[np.ndarray, Measurements]:
        self._destroy_actors()
        if seed is not None:
            self._rng = np.random.default_rng(seed)
            self.traffic_manager.set_random_device_seed(int(seed))
            if self.config.walkers:
                self.world.set_pedestrians_seed(int(seed))
        spawn_point = self._spawn_ego()
        self._spawn_npcs()
        self._spawn_walkers()
        self._attach_sensors()
        # Planned from the spawn point: until the next tick the client reports a new actor at
        # the origin (its state comes with the tick's snapshot).
        self._route = self._planner.plan(self.map.get_waypoint(spawn_point.location),
                                         self.config.route_length_m, self._rng)
        self._line = Route(np.array([_xy(w.transform.location) for w in self._route]))
        self._route_index = 0  # the last waypoint the car has passed
        frame, observation = self._first_camera_frame()
        self._episode_start_frame = frame  # contacts while spawning are not the policy's
        return observation, self._measure()

    def view(self) -> np.ndarray | None:
        """The chase camera's image of the last frame, RGB uint8 (height, width, 3); None without
        the chase camera."""
        if self._view is None:
            return None
        bgra = np.frombuffer(self._view.raw_data, dtype=np.uint8).reshape(self._view.height, self._view.width, 4)
        return np.ascontiguousarray(bgra[:, :, 2::-1])

    def step(self, action: np.ndarray) -> tuple[np.ndarray, Measurements]:
        throttle_brake = float(action[THROTTLE_BRAKE])
        control = self.carla.VehicleControl(
            throttle=max(throttle_brake, 0.0), steer=float(action[STEER]), brake=max(-throttle_brake, 0.0)
        )
        self._lost("step_failures", self.ego.apply_control, control)
        for _ in range(self.config.physics_steps_per_control_step):
            frame = self._tick()
        return self._camera_frame(frame), self._lost("step_failures", self._measure)

    def health(self) -> dict[str, float]:
        """Cumulative ticks, and the wall and simulated seconds they took."""
        return {"ticks": self._ticks, "wall_seconds": self._wall_seconds, "sim_seconds": self._sim_seconds}

    def close(self) -> None:
        """Leaves the server as found: our actors gone, the Traffic Manager shut down while the
        server can still answer its destructor's call, then the world back to asynchronous.
        Best effort: after a server loss each step may fail, and the rest is skipped."""
        try:
            self._destroy_actors()
            self.traffic_manager.shut_down()
            settings = self.world.get_settings()
            settings.synchronous_mode = False  # a shared server runs freely again
            settings.fixed_delta_seconds = None
            self.world.apply_settings(settings)
        except RuntimeError:
            pass

    # --- Spawning and cleanup -----------------------------------------------------------

    def _choice(self, n: int) -> int:
        # A Python int: Boost.Python refuses numpy integers as indices and ids.
        return int(self._rng.integers(n))

    def _spawn_ego(self):
        blueprint = self.world.get_blueprint_library().find("vehicle.tesla.model3")
        blueprint.set_attribute("role_name", EGO_ROLE)
        points = self.map.get_spawn_points()
        for i in self._rng.permutation(len(points)):
            self.ego = self.world.try_spawn_actor(blueprint, points[int(i)])
            if self.ego is not None:
                self._actor_ids.append(self.ego.id)
                self._ego_spawn_index = int(i)
                return points[int(i)]
        raise ServerLost("reset_failures", f"no free spawn point for the ego car in {self.config.town}")

    def _tagged(self, blueprint):
        if blueprint.has_attribute("role_name"):
            blueprint.set_attribute("role_name", self.role)
        return blueprint

    def _spawn_npcs(self) -> None:
        command = self.carla.command
        blueprints = [
            bp for bp in self.world.get_blueprint_library().filter("vehicle.*")
            if int(bp.get_attribute("number_of_wheels")) == 4
        ]
        points = self.map.get_spawn_points()
        free = [int(i) for i in self._rng.permutation(len(points)) if i != self._ego_spawn_index]
        batch = [
            command.SpawnActor(self._tagged(blueprints[self._choice(len(blueprints))]), points[i]).then(
                command.SetAutopilot(command.FutureActor, True, self.tm_port)
            )
            for i in free[: self.config.npc_vehicles]
        ]
        self._npc_ids = self._apply_spawn_batch(batch)
        self._actor_ids.extend(self._npc_ids)

    def _spawn_walkers(self) -> None:
        """As CARLA's generate_traffic.py: walkers at navigation points, one AI controller each,
        a tick so the controllers see their walkers, then a destination and a speed."""
        if not self.config.walkers:
            return
        command, library = self.carla.command, self.world.get_blueprint_library()
        walker_bps = library.filter("walker.pedestrian.*")
        walkers, speeds = [], []
        for _ in range(self.config.walkers):
            place = self.world.get_random_location_from_navigation()
            if place is None:  # no navigation point found this time: one walker fewer
                continue
            bp = self._tagged(walker_bps[self._choice(len(walker_bps))])
            if bp.has_attribute("is_invincible"):
                bp.set_attribute("is_invincible", "false")
            speeds.append(float(bp.get_attribute("speed").recommended_values[1]))  # walking
            walkers.append((command.SpawnActor(bp, self.carla.Transform(place)), speeds[-1]))
        walker_ids, walker_speeds = [], []
        for response, (_, speed) in zip(self.client.apply_batch_sync([w for w, _ in walkers], False), walkers):
            if not response.error:
                walker_ids.append(response.actor_id)
                walker_speeds.append(speed)
        self._actor_ids.extend(walker_ids)
        controller_bp = library.find("controller.ai.walker")
        controller_ids = self._apply_spawn_batch(
            [command.SpawnActor(controller_bp, self.carla.Transform(), int(w)) for w in walker_ids]
        )
        self._controllers = list(self.world.get_actors(controller_ids))
        self._tick()  # controllers need their walkers in the snapshot before they take orders
        for controller, speed in zip(self._controllers, walker_speeds):
            controller.start()
            destination = self.world.get_random_location_from_navigation()
            if destination is not None:
                controller.go_to_location(destination)
            controller.set_max_speed(speed)

    def _apply_spawn_batch(self, batch: list) -> list[int]:
        """Ids of what spawned; an occupied spawn point is one actor fewer, not a failure."""
        return [r.actor_id for r in self.client.apply_batch_sync(batch, False) if not r.error]

    def _attach_sensors(self) -> None:
        carla, cam = self.carla, self.config.camera
        library = self.world.get_blueprint_library()
        camera_bp = self._tagged(library.find("sensor.camera.rgb"))
        camera_bp.set_attribute("image_size_x", str(cam.width))
        camera_bp.set_attribute("image_size_y", str(cam.height))
        camera_bp.set_attribute("fov", str(self.config.camera_fov_deg))
        mount = carla.Transform(carla.Location(**CAMERA_MOUNT))
        self._camera_queue: queue.Queue = queue.Queue()
        # Collision events come on the client's streaming threads, possibly after the step
        # that covers their frame was measured: each is counted once, at the next measurement.
        self._collisions: list[tuple[int, str]] = []  # (frame, what was hit)
        self._collision_lock = threading.Lock()
        sensors = [
            (camera_bp, mount, self._camera_queue.put),
            (self._tagged(library.find("sensor.other.collision")), carla.Transform(), self._on_collision),
        ]
        self._view_queue: queue.Queue = queue.Queue()
        if self._with_view:
            view_bp = self._tagged(library.find("sensor.camera.rgb"))
            view_bp.set_attribute("image_size_x", str(VIEW_SIZE[0]))
            view_bp.set_attribute("image_size_y", str(VIEW_SIZE[1]))
            view_mount = carla.Transform(carla.Location(**VIEW_MOUNT), carla.Rotation(pitch=VIEW_PITCH_DEG))
            sensors.append((view_bp, view_mount, self._view_queue.put))
        for blueprint, transform, callback in sensors:
            sensor = self.world.spawn_actor(blueprint, transform, attach_to=self.ego)
            self._sensors.append(sensor)
            sensor.listen(callback)

    def _on_collision(self, event) -> None:
        with self._collision_lock:
            self._collisions.append((event.frame, _collision_kind(event.other_actor.type_id)))

    def _destroy_actors(self) -> None:
        """Sensors first (stop their callbacks), then controllers, then cars and walkers in one
        batch; the lists are emptied even if the server refuses, so nothing is destroyed twice."""
        sensors, controllers, ids = self._sensors, self._controllers, self._actor_ids
        self._sensors, self._controllers, self._actor_ids = [], [], []
        try:
            for sensor in sensors:
                if sensor.is_listening():
                    sensor.stop()
            for controller in controllers:
                controller.stop()
        finally:
            everything = [s.id for s in sensors] + [c.id for c in controllers] + ids
            if everything:
                self.client.apply_batch_sync([self.carla.command.DestroyActor(int(i)) for i in everything], False)

    # --- Ticking and sensors ------------------------------------------------------------

    def _tick(self) -> int:
        start = time.perf_counter()
        timeout = float(self.config.server.tick_timeout_s)
        self._frame = self._lost("tick_timeouts", self.world.tick, timeout)
        self._wall_seconds += time.perf_counter() - start
        self._sim_seconds += 1.0 / self.config.simulation_hz
        self._ticks += 1
        return self._frame

    def _first_camera_frame(self) -> tuple[int, np.ndarray]:
        """The first frame of an episode with its image. A camera just spawned may miss its first
        frames while rendering warms up: the world ticks on (up to FIRST_IMAGE_TICKS ticks, each
        image waited for FIRST_IMAGE_WAIT_S) before a missing image counts as a lost server."""
        for _ in range(FIRST_IMAGE_TICKS - 1):
            frame = self._tick()
            image = self._image_of(self._camera_queue, frame, FIRST_IMAGE_WAIT_S)
            if image is not None:
                return frame, self._grayscale(image)
        frame = self._tick()
        return frame, self._camera_frame(frame)

    def _camera_frame(self, frame: int) -> np.ndarray:
        """The camera image of exactly this world frame, as uint8 grayscale (height, width)."""
        timeout = self.config.server.tick_timeout_s
        image = self._image_of(self._camera_queue, frame, timeout)
        if image is None:
            raise ServerLost("sensor_timeouts", f"no camera image for frame {frame} within {timeout:g} s")
        return self._grayscale(image)

    def _grayscale(self, image) -> np.ndarray:
        """The image as uint8 grayscale (height, width). The chase view's image of the same frame
        is taken too, when there is a chase camera."""
        frame = image.frame
        if self._with_view:
            # Only for people (videos): a missed image is no view for this step, never a lost
            # episode. Both cameras render in the same frame, so a short wait is enough.
            self._view = self._image_of(self._view_queue, frame, min(self.config.server.tick_timeout_s, VIEW_WAIT_S))
        bgra = np.frombuffer(image.raw_data, dtype=np.uint8).reshape(image.height, image.width, 4)
        return np.rint(bgra[:, :, :3] @ BGR_TO_GRAY).clip(0, 255).astype(np.uint8)

    @staticmethod
    def _image_of(images: queue.Queue, frame: int, timeout_s: float):
        """The image of this frame, or None if it did not come within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                image = images.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                return None
            if image.frame == frame:
                return image
            # An image of an earlier frame (late delivery) is skipped, never used.

    # --- Route and measurements ---------------------------------------------------------

    def _measure(self) -> Measurements:
        transform = self.ego.get_transform()
        position, heading = _xy(transform.location), math.radians(transform.rotation.yaw)
        forward, right = car_axes(heading)
        v = self.ego.get_velocity()
        route = self._line
        s, lateral = route.locate(position)
        self._route_index = int(np.searchsorted(route.s, s, side="right")) - 1
        lane_width = float(self._route[self._route_index].lane_width)

        gap, closing = math.inf, 0.0
        for npc in self.world.get_actors(self._npc_ids):
            offset = _xy(npc.get_transform().location) - position
            along = float(np.dot(offset, forward))
            if along > 0 and abs(np.dot(offset, right)) < lane_width / 2 and along - NPC_LENGTH_M < gap:
                gap = max(0.0, along - NPC_LENGTH_M)
                w = npc.get_velocity()
                closing = float(np.dot(np.array([v.x - w.x, v.y - w.y]), forward))

        with self._collision_lock:  # every event since the last measurement, however late
            # The first counts: a collision ends the episode.
            hits = [kind for frame, kind in self._collisions if frame > self._episode_start_frame]
            self._collisions.clear()
        return Measurements(
            speed_mps=math.sqrt(v.x**2 + v.y**2 + v.z**2),
            lateral_offset_m=lateral,
            heading_error_rad=route.heading_error(heading, s),
            lane_width_m=lane_width,
            lookahead_lateral_m=route.lateral_ahead(position, heading, s, self.config.state.lookahead_m),
            front_gap_m=gap,
            front_closing_mps=closing,
            collided=bool(hits),
            on_route=abs(lateral) <= self.config.max_route_deviation_m,
            route_progress_m=route.progress_m,
            route_length_m=route.length_m,
            collided_with=hits[0] if hits else Measurements.collided_with,
            off_road=self.map.get_waypoint(transform.location, project_to_road=False) is None,
            wrong_lane=abs(lateral) > lane_width / 2,
        )
