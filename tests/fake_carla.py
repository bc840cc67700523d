"""A test double of the `carla` 0.9.16 client: the parts carla_env/carla_sim.py uses.

No CARLA server can run on CI machines, so the CARLA backend is tested against this: a straight
three-lane road along +x (lanes 3.5 m wide, centres at y = 0, 3.5, 7), NPC cars at constant
speed, a kinematic ego car, sensors that deliver per-frame data through `listen` callbacks.

`FakeCarla(tcp=True)` ticks through a real process (tests/fake_carla_server.py) on the client's
host:port: a killed process refuses, a stopped one times out, as real servers do. Faults for
tests: `world.drop_camera_frames` (frames whose image never arrives), `world.late_frames`
(frames whose image arrives after the next frame's), `world.collide_at_frame`.
"""

from __future__ import annotations

import fnmatch
import math
import socket
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

LANE_WIDTH = 3.5
MAPS = [f"/Game/Carla/Maps/{t}" for t in ("Town01", "Town02", "Town03", "Town10HD_Opt")]


@dataclass
class Vector3D:
    x: float = 0.0
    y: float = 0.0
    z: float = 0.0


Location = Vector3D


@dataclass
class Rotation:
    pitch: float = 0.0
    yaw: float = 0.0
    roll: float = 0.0


@dataclass
class Transform:
    location: Location = field(default_factory=Location)
    rotation: Rotation = field(default_factory=Rotation)


@dataclass
class VehicleControl:
    throttle: float = 0.0
    steer: float = 0.0
    brake: float = 0.0


class WeatherParameters:
    ClearNoon = "ClearNoon"
    WetNoon = "WetNoon"
    HardRainNoon = "HardRainNoon"


@dataclass
class WorldSettings:
    synchronous_mode: bool = False
    fixed_delta_seconds: float | None = None


class Blueprint:
    def __init__(self, blueprint_id: str, **attributes):
        self.id, self.attributes = blueprint_id, {k: str(v) for k, v in attributes.items()}

    def set_attribute(self, key, value):
        self.attributes[key] = str(value)

    def get_attribute(self, key):
        return self.attributes[key]


class BlueprintLibrary:
    def __init__(self):
        self._all = [
            Blueprint("vehicle.tesla.model3", number_of_wheels=4, role_name="autopilot"),
            Blueprint("vehicle.audi.a2", number_of_wheels=4, role_name="autopilot"),
            Blueprint("vehicle.yamaha.yzf", number_of_wheels=2, role_name="autopilot"),
            Blueprint("walker.pedestrian.0001"),
            Blueprint("controller.ai.walker"),
            Blueprint("sensor.camera.rgb", image_size_x=800, image_size_y=600, fov=90),
            Blueprint("sensor.other.collision"),
            Blueprint("sensor.other.lane_invasion"),
        ]

    def find(self, blueprint_id):
        bp = next(b for b in self._all if b.id == blueprint_id)
        return Blueprint(bp.id, **bp.attributes)

    def filter(self, pattern):
        return [Blueprint(b.id, **b.attributes) for b in self._all if fnmatch.fnmatch(b.id, pattern)]


class Waypoint:
    def __init__(self, x: float, lane: int):
        self.lane, self.lane_width = lane, LANE_WIDTH
        self.transform = Transform(Location(x, lane * LANE_WIDTH, 0.0), Rotation(yaw=0.0))

    def next(self, distance):
        return [Waypoint(self.transform.location.x + distance, self.lane)]


class Map:
    def __init__(self, town: str):
        self.name = f"Carla/Maps/{town}"

    def get_spawn_points(self):
        return [Transform(Location(20.0 * i, LANE_WIDTH * (i % 3), 0.3)) for i in range(40)]

    def get_waypoint(self, location, project_to_road=True):
        lane = int(np.clip(round(location.y / LANE_WIDTH), 0, 2))
        return Waypoint(location.x, lane)


class Actor:
    def __init__(self, world, actor_id, type_id, transform, parent=None):
        self.world, self.id, self.type_id, self.parent = world, actor_id, type_id, parent
        self._transform, self.speed, self.control = transform, 0.0, VehicleControl()
        self.is_alive, self.autopilot = True, False

    def get_transform(self):
        if self.parent is not None:
            return self.parent.get_transform()
        t = self._transform
        return Transform(Location(t.location.x, t.location.y, t.location.z), Rotation(yaw=t.rotation.yaw))

    def get_velocity(self):
        yaw = math.radians(self._transform.rotation.yaw)
        return Vector3D(self.speed * math.cos(yaw), self.speed * math.sin(yaw), 0.0)

    def apply_control(self, control):
        self.control = control

    def destroy(self):
        return self.world._destroy(self.id)

    # walker controllers
    def start(self):
        pass

    def go_to_location(self, location):
        pass

    def stop(self):
        self.listening = False


class Sensor(Actor):
    listening = False

    @property
    def is_listening(self):
        return self.listening

    def listen(self, callback):
        self.callback, self.listening = callback, True


class World:
    def __init__(self, client, town):
        self.client, self.map, self.settings = client, Map(town), WorldSettings()
        self.actors: dict[int, Actor] = {}
        self.frame, self._next_id, self.weather = 0, 100, None
        self.drop_camera_frames: set[int] = set()
        self.late_frames: set[int] = set()
        self.collide_at_frame: int | None = None
        self._held_images: list = []
        self._walker_places = 0
        self._socket = None

    # --- API used by the simulator
    def get_map(self):
        return self.map

    def get_settings(self):
        return WorldSettings(self.settings.synchronous_mode, self.settings.fixed_delta_seconds)

    def apply_settings(self, settings):
        self.settings = settings
        return self.frame

    def set_weather(self, weather):
        self.weather = weather

    def get_blueprint_library(self):
        return BlueprintLibrary()

    def get_random_location_from_navigation(self):
        self._walker_places += 1  # on the sidewalk, 7 m apart: never two in one place
        return Location(7.0 * self._walker_places, -3.0, 0.0)

    def try_spawn_actor(self, blueprint, transform):
        if any(self._occupied(transform, a) for a in self.actors.values()):
            return None
        return self._spawn(blueprint, transform)

    def spawn_actor(self, blueprint, transform, attach_to=None):
        return self._spawn(blueprint, transform, attach_to)

    def get_actors(self, ids=None):
        return [a for i, a in self.actors.items() if ids is None or i in ids]

    def tick(self, seconds=None):
        if not self.settings.synchronous_mode:
            raise AssertionError("the simulator must tick in synchronous mode")
        self.frame = self.client._remote_tick() if self.client.tcp else self.frame + 1
        dt = self.settings.fixed_delta_seconds
        for actor in list(self.actors.values()):
            if actor.type_id.startswith("vehicle.") and actor.parent is None:
                self._move(actor, dt)
        self._deliver_sensor_data()
        return self.frame

    # --- inside the double
    def _spawn(self, blueprint, transform, parent=None):
        cls = Sensor if blueprint.id.startswith("sensor.") else Actor
        actor = cls(self, self._next_id, blueprint.id, transform, parent)
        actor.attributes = dict(blueprint.attributes)
        self.actors[actor.id], self._next_id = actor, self._next_id + 1
        return actor

    def _destroy(self, actor_id):
        return self.actors.pop(actor_id, None) is not None

    @staticmethod
    def _occupied(transform, actor):
        p = actor.get_transform().location
        return math.dist((p.x, p.y), (transform.location.x, transform.location.y)) < 2.0

    def _move(self, car, dt):
        if car.autopilot:
            car.speed = 8.0
        else:
            c = car.control
            car.speed = max(0.0, car.speed + (4.0 * c.throttle - 8.0 * c.brake) * dt)
            car._transform.rotation.yaw += 30.0 * c.steer * dt * min(car.speed, 1.0)
        yaw = math.radians(car._transform.rotation.yaw)
        car._transform.location.x += car.speed * math.cos(yaw) * dt
        car._transform.location.y += car.speed * math.sin(yaw) * dt

    def ego(self):
        return next(a for a in self.actors.values() if a.attributes.get("role_name") == "hero")

    def _deliver_sensor_data(self):
        ego = self.ego()
        for sensor in [a for a in self.actors.values() if isinstance(a, Sensor) and a.listening]:
            if sensor.type_id == "sensor.camera.rgb":
                image = self._image(sensor, ego)
                held, self._held_images = self._held_images, []
                if self.frame in self.late_frames:
                    self._held_images = [image]
                elif self.frame not in self.drop_camera_frames:
                    sensor.callback(image)
                for late in held:
                    sensor.callback(late)
            elif sensor.type_id == "sensor.other.collision" and self.frame == self.collide_at_frame:
                sensor.callback(SimpleNamespace(frame=self.frame, other_actor=None))

    def _image(self, sensor, ego):
        w, h = int(sensor.attributes["image_size_x"]), int(sensor.attributes["image_size_y"])
        # A picture that depends on where the car is, so that a stale image would show.
        shade = int(ego.get_transform().location.x * 10) % 200
        bgra = np.full((h, w, 4), shade, np.uint8)
        bgra[:, : w // 2, 2] = 255  # red left half
        return SimpleNamespace(frame=self.frame, width=w, height=h, raw_data=bgra.tobytes())


class TrafficManager:
    def __init__(self, port):
        self.port, self.synchronous, self.seed = port, False, None

    def set_synchronous_mode(self, on):
        self.synchronous = on

    def set_random_device_seed(self, seed):
        self.seed = seed

    def get_port(self):
        return self.port


class _SpawnActor:
    def __init__(self, blueprint, transform, parent=None):
        self.blueprint, self.transform, self.parent, self.then_cmd = blueprint, transform, parent, None

    def then(self, command):
        self.then_cmd = command
        return self


class _Command:
    FutureActor = object()
    SpawnActor = _SpawnActor

    @staticmethod
    def SetAutopilot(actor, enabled, port):
        return SimpleNamespace(kind="autopilot", enabled=enabled, port=port)

    @staticmethod
    def DestroyActor(actor_id):
        return SimpleNamespace(kind="destroy", actor_id=actor_id)


class Client:
    def __init__(self, fake, host, port):
        self.fake, self.host, self.port, self.tcp = fake, host, port, fake.tcp
        self.timeout, self._socket, self.world = 5.0, None, None
        fake.clients.append(self)

    def set_timeout(self, seconds):
        self.timeout = seconds

    def get_available_maps(self):
        return list(MAPS)

    def get_world(self):
        if self.world is None:
            self.world = World(self, "Town01")
        return self.world

    def load_world(self, town):
        self.world = World(self, town)
        return self.world

    def get_trafficmanager(self, port):
        self.traffic_manager = TrafficManager(port)
        return self.traffic_manager

    def apply_batch_sync(self, commands, do_tick=False):
        responses = []
        for command in commands:
            if getattr(command, "kind", None) == "destroy":
                ok = self.world._destroy(command.actor_id)
                responses.append(SimpleNamespace(actor_id=command.actor_id, error="" if ok else "not found"))
                continue
            parent = self.world.actors.get(command.parent) if command.parent is not None else None
            actor = self.world.try_spawn_actor(command.blueprint, command.transform) if parent is None \
                else self.world.spawn_actor(command.blueprint, command.transform, parent)
            if actor is None:
                responses.append(SimpleNamespace(actor_id=0, error="Spawn failed because of collision at spawn position"))
                continue
            if command.then_cmd is not None:
                actor.autopilot = command.then_cmd.enabled
            responses.append(SimpleNamespace(actor_id=actor.id, error=""))
        return responses

    def _remote_tick(self) -> int:
        message = f"time-out of {int(self.timeout * 1000)}ms while waiting for the simulator, make sure the simulator is ready and connected to {self.host}:{self.port}"
        try:
            if self._socket is None:
                self._socket = socket.create_connection((self.host, self.port), timeout=self.timeout)
                self._lines = self._socket.makefile("rb")
            self._socket.sendall(b"tick\n")
            line = self._lines.readline()
        except socket.timeout:
            raise RuntimeError(message) from None
        except OSError as e:
            raise RuntimeError(f"{message} ({e})") from None
        if not line:
            self._socket = None
            raise RuntimeError(f"{message} (connection closed)")
        return int(line)


class FakeCarla:
    """Use as the `carla` module: `CarlaSimulator(..., carla_module=FakeCarla())`."""

    WeatherParameters = WeatherParameters
    Transform, Location, Rotation, Vector3D = Transform, Location, Rotation, Vector3D
    VehicleControl = VehicleControl
    command = _Command

    def __init__(self, tcp: bool = False):
        self.tcp, self.clients = tcp, []

    def Client(self, host, port):
        return Client(self, host, port)

    @property
    def world(self) -> World:
        return self.clients[-1].world
