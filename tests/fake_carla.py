"""A test double of the `carla` 0.9.16 client: the parts carla_env/ uses, faithful where it matters.

No CARLA server can run on CI machines, so the CARLA backend is tested against this: a straight
three-lane road along +x (lanes 3.5 m wide, centres at y = 0, 3.5, 7), or a ring of three lanes
where every spawn point is on a curve (`FakeCarla(ring_radius=...)`), or a 3x3 grid of two-way
streets with a 4-way junction, T junctions and bends (`FakeCarla(grid_block_m=...)`); NPC cars
the Traffic Manager drives at a constant speed along their lane, a kinematic (bicycle) ego car,
sensors that deliver data through `listen` callbacks.

Maps are made of lanes as a real map's OpenDRIVE is, and answer as the real 0.9.16 client does
for an OpenDRIVE map it loads without a server (`carla.Map(name, xodr)`; tests/test_carla_routes.py
plans a route on one): a lane is one lane of one road section, named (road_id, section_id,
lane_id); `Map.get_topology()` gives one (entry, exit) pair per lane and lane it leads to, the
entry at the lane's start and the exit at the next lane's start (a dead end's: its own end; the
real client leaves some of those out, see carla_env/carla_sim.py `RoutePlanner`);
`Waypoint.next(d)` past a lane's end gives a waypoint on each lane it leads to (several at a
junction's entry, none at a dead end); `Map.get_waypoint(location, project_to_road=False)` is
None off every lane.

Where the real client (0.9.16) behaves in a way our code must handle, the double does too; each
point is from the review `../shared/notes/carla-0.9.16-review.md`, section (b):

- an actor's transform and velocity are (0, 0, 0) until the first tick after it spawned (the
  client reads them from the last received snapshot);
- Boost.Python refuses numpy scalars: `BlueprintLibrary[np.int64]`, `DestroyActor(np.int64)`,
  `VehicleControl(steer=np.float32)` raise; `filter()` returns a `BlueprintLibrary`; a missing
  blueprint or attribute raises IndexError; attributes are `ActorAttribute`s;
- `Sensor.is_listening` is a method;
- the Traffic Manager is one object per port *per process* (here: per `FakeCarla`, which stands
  for one process's `carla` module), bound to the client that first asked for it, ticked by every
  successful `world.tick()` of that process; one bound to a server that is gone calls it from its
  own C++ thread and the process aborts (`os.abort()`, as carla#4577/#6748 report);
- `load_world` takes time (`FakeCarla(load_world_s=...)`) and fails with "failed to connect to
  newly created map" when the client timeout is shorter;
- sensor data arrives from another thread, possibly after `tick()` returned; camera images can
  be late or dropped (`world.late_frames`, `world.drop_camera_frames`, one camera's:
  `world.drop_sensor_frames`); a contact produces one
  collision event per frame in contact, possibly late (`world.collisions[frame] = n`,
  `world.collision_delay_ticks`); lane invasion events fire when the ego crosses a lane line;
- `get_random_location_from_navigation` returns None now and then (every 4th call); walkers
  walk to their controller's destination;
- the ego touching a car, a walker or a static prop (centres within CONTACT_M) is a collision
  event whose `other_actor` is that actor; an event a test adds hits the world's geometry,
  which the server reports as an actor of type "static.<its tag>" (e.g. "static.building");
- every call to the server, the tick's too, runs under the client's timeout (`set_timeout`):
  `world.tick(seconds)` sends its tick cue as an RPC (LibCarla `Simulator::Tick` ->
  `Client::SendTickCue`), and `seconds` bounds only the wait for the frame's snapshot; a call
  fails only at that timeout, whether the server was killed, hangs, closed or refused the
  connection, and so does every later call on a lost connection (rpclib, measured with the
  real 0.9.16 wheel: ../shared/notes/carla-0.9.16-review-2.md, N3).

`FakeCarla(tcp=True)` talks to a real process (tests/fake_carla_server.py) for everything the
server's game thread answers (ticks, settings, the Traffic Manager's calls) and for what it
answers off that thread (map list, version): a killed process refuses, a stopped one times out, a
process whose game thread hangs still answers the map list, as real servers do.
"""

from __future__ import annotations

import fnmatch
import heapq
import itertools
import math
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

LANE_WIDTH = 3.5
MAPS = [f"/Game/Carla/Maps/{t}" for t in ("Town01", "Town02", "Town03", "Town10HD_Opt")]
NPC_SPEED_MPS = 8.0
FLOAT_EPSILON = float(np.finfo(np.float32).eps)  # std::numeric_limits<float>::epsilon()
CONTACT_M = 2.5  # centres closer than this: the cars touch
WORLD_GEOMETRY = SimpleNamespace(id=0, type_id="static.building")  # what a building is as `other_actor`
CURB = SimpleNamespace(id=0, type_id="static.sidewalk")  # the road's edge: a car that leaves the road hits it
CURB_M = LANE_WIDTH / 2 + 0.9  # from the nearest lane's centre: a car's wheels (half its width) at the edge
MAX_STEER_DEG, WHEELBASE_M = 70.0, 2.9  # CARLA's default front-wheel angle; a Tesla Model 3


def _boost(signature: str, **arguments) -> None:
    """Boost.Python's argument check, as the real 0.9.16 wheel does it (tests/test_carla_backend.py
    compares the two): C++ integers take Python int or bool only; C++ floats take anything that
    is a Python int or float (np.float64 is a float subclass), but not np.float32 or np.int64."""
    for name, (value, kind) in arguments.items():
        ok = type(value) in (int, bool) if kind is int else isinstance(value, (int, float))
        if not ok:
            raise TypeError(
                f"Python argument types in\n    {signature}({type(value).__module__}.{type(value).__name__})\n"
                f"did not match C++ signature ({name})"
            )


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

    def get_forward_vector(self):
        yaw = math.radians(self.rotation.yaw)
        return Vector3D(math.cos(yaw), math.sin(yaw), 0.0)

    def get_right_vector(self):
        # CARLA is left-handed (UE4): x forward, y right, z up; yaw turns +x towards +y.
        yaw = math.radians(self.rotation.yaw)
        return Vector3D(-math.sin(yaw), math.cos(yaw), 0.0)


class VehicleControl:
    def __init__(self, throttle=0.0, steer=0.0, brake=0.0, hand_brake=False, reverse=False,
                 manual_gear_shift=False, gear=0):
        _boost("VehicleControl.__init__", throttle=(throttle, float), steer=(steer, float), brake=(brake, float))
        self.throttle, self.steer, self.brake = float(throttle), float(steer), float(brake)
        self.hand_brake, self.reverse, self.manual_gear_shift, self.gear = hand_brake, reverse, manual_gear_shift, gear


class WeatherParameters:
    ClearNoon = "ClearNoon"
    WetNoon = "WetNoon"
    HardRainNoon = "HardRainNoon"


@dataclass
class WorldSettings:
    synchronous_mode: bool = False
    no_rendering_mode: bool = False
    fixed_delta_seconds: float | None = None
    substepping: bool = True
    max_substep_delta_time: float = 0.01
    max_substeps: int = 10


class ActorAttribute:
    def __init__(self, value: str, recommended_values: list[str] | None = None):
        self.value, self.recommended_values = value, recommended_values or []

    def __int__(self):
        return int(self.value)

    def __float__(self):
        return float(self.value)

    def __str__(self):
        return self.value

    def as_str(self):
        return self.value


class Blueprint:
    def __init__(self, blueprint_id: str, **attributes):
        self.id = blueprint_id
        self.attributes = {k: v if isinstance(v, ActorAttribute) else ActorAttribute(str(v)) for k, v in attributes.items()}

    def has_attribute(self, key):
        return key in self.attributes

    def set_attribute(self, key, value):
        if key not in self.attributes:
            raise IndexError(f"no attribute {key!r} in {self.id}")
        self.attributes[key] = ActorAttribute(str(value), self.attributes[key].recommended_values)

    def get_attribute(self, key):
        if key not in self.attributes:
            raise IndexError(f"no attribute {key!r} in {self.id}")
        return self.attributes[key]

    def copy(self):
        return Blueprint(self.id, **{k: ActorAttribute(v.value, v.recommended_values) for k, v in self.attributes.items()})


def _all_blueprints() -> list[Blueprint]:
    car = {"role_name": "autopilot", "color": "0,0,0"}
    return [
        Blueprint("vehicle.tesla.model3", number_of_wheels=4, **car),
        Blueprint("vehicle.audi.a2", number_of_wheels=4, **car),
        Blueprint("vehicle.yamaha.yzf", number_of_wheels=2, **car),
        Blueprint("walker.pedestrian.0001", is_invincible="true", role_name="pedestrian",
                  speed=ActorAttribute("1.4", ["0.0", "1.4", "2.8"])),
        Blueprint("walker.pedestrian.0002", is_invincible="true", role_name="pedestrian",
                  speed=ActorAttribute("1.2", ["0.0", "1.2", "2.4"])),
        Blueprint("controller.ai.walker"),
        Blueprint("static.prop.streetbarrier", role_name="prop"),
        Blueprint("sensor.camera.rgb", image_size_x=800, image_size_y=600, fov=90, sensor_tick=0.0, role_name="front"),
        Blueprint("sensor.other.collision", role_name="front"),
        Blueprint("sensor.other.lane_invasion", role_name="front"),
    ]


class BlueprintLibrary:
    """Not a list: `filter` returns another library, indexing takes a Python int only."""

    def __init__(self, blueprints: list[Blueprint] | None = None):
        self._all = _all_blueprints() if blueprints is None else blueprints

    def find(self, blueprint_id):
        for b in self._all:
            if b.id == blueprint_id:
                return b.copy()
        raise IndexError(f"blueprint {blueprint_id!r} not found")

    def filter(self, pattern):
        return BlueprintLibrary([b for b in self._all if fnmatch.fnmatch(b.id, pattern)])

    def __len__(self):
        return len(self._all)

    def __iter__(self):
        return (b.copy() for b in self._all)

    def __getitem__(self, index):
        _boost("BlueprintLibrary.__getitem__", index=(index, int))
        return self._all[index].copy()


class Lane:
    """One lane of one road section, what a real map names (road_id, section_id, lane_id), driven
    from s = 0 to s = length: a straight line, or a circular arc (curvature > 0 turns right)."""

    def __init__(self, ids: tuple[int, int, int], start: tuple[float, float], yaw_deg: float, length: float,
                 curvature: float = 0.0, is_junction: bool = False):
        self.road_id, self.section_id, self.lane_id = ids
        self.start, self.heading, self.length = start, math.radians(yaw_deg), length
        self.curvature, self.is_junction = curvature, is_junction
        self.successors: list[Lane] = []

    def pose(self, s: float) -> tuple[float, float, float]:
        """x, y and yaw (degrees) at s."""
        (x, y), h, k = self.start, self.heading, self.curvature
        if k == 0.0:
            return x + s * math.cos(h), y + s * math.sin(h), math.degrees(h)
        end = h + k * s  # the centre is 1/k to the right of the start
        return x + (math.sin(end) - math.sin(h)) / k, y - (math.cos(end) - math.cos(h)) / k, math.degrees(end)

    def project(self, x: float, y: float) -> tuple[float, float]:
        """(s, distance) of the centre line's point nearest to (x, y)."""
        (x0, y0), h, k = self.start, self.heading, self.curvature
        if k == 0.0:
            s = (x - x0) * math.cos(h) + (y - y0) * math.sin(h)
        else:
            cx, cy = x0 - math.sin(h) / k, y0 + math.cos(h) / k
            swept = (math.atan2(k * (x - cx), -k * (y - cy)) - h) * math.copysign(1.0, k) % (2 * math.pi)
            s = swept / abs(k)
            if s > self.length:  # beyond the arc: its nearer end
                s = self.length if s - self.length < 2 * math.pi / abs(k) - s else 0.0
        s = min(max(s, 0.0), self.length)
        px, py, _ = self.pose(s)
        return s, math.hypot(x - px, y - py)

    def advance(self, s: float, distance: float) -> list[tuple[Lane, float]]:
        """Where `distance` further along leads: past the lane's end, onto each successor."""
        if s + distance <= self.length + 1e-9:
            return [(self, s + distance)]
        return [p for lane in self.successors for p in lane.advance(0.0, s + distance - self.length)]


def straight_road(length: float = 1000.0) -> tuple[list[Lane], list[tuple[Lane, float]]]:
    """Three lanes along +x from x = 0, lane k's centre at y = k * LANE_WIDTH, dead ends."""
    lanes = [Lane((0, 0, -1 - k), (0.0, k * LANE_WIDTH), 0.0, length) for k in range(3)]
    return lanes, [(lanes[i % 3], 20.0 * i) for i in range(40)]


def ring_road(radius: float = 12.0) -> tuple[list[Lane], list[tuple[Lane, float]]]:
    """Three lanes around a circle that turns right (like a roundabout's), the outer lane of
    radius `radius`, each lane LANE_WIDTH further in: a road with no straight metre. Angle 0 is
    at the origin, heading +x, lane k at y = k * LANE_WIDTH, as on the straight road. Each lane
    is four quarter-circle sections, each the next one's predecessor, the last the first's."""
    lanes, spawns = [], []
    for k in range(3):
        r = radius - k * LANE_WIDTH
        quarters = [Lane((0, q, -1 - k), (r * math.sin(q * math.pi / 2), radius - r * math.cos(q * math.pi / 2)),
                         90.0 * q, r * math.pi / 2, 1.0 / r) for q in range(4)]
        for q, lane in enumerate(quarters):
            lane.successors = [quarters[(q + 1) % 4]]
        lanes += quarters
    for i in range(12):
        angle, r = 2 * math.pi * i / 12, radius - (i % 3) * LANE_WIDTH
        q = int(angle // (math.pi / 2))
        spawns.append((lanes[4 * (i % 3) + q], r * (angle - q * math.pi / 2)))
    return lanes, spawns


GRID_DIRECTIONS = {"E": (1, 0), "S": (0, 1), "W": (-1, 0), "N": (0, -1)}  # CARLA's y points right of +x


def grid_town(block_m: float = 60.0, junction_half_m: float = 10.0) -> tuple[list[Lane], list[tuple[Lane, float]]]:
    """A 3x3 grid of junctions `block_m` apart, joined by two-way streets (one lane each way,
    right-hand traffic, as carla_env/town.py's embedded town):

        B----T----B      B: a 90-degree bend (a curved road, not a junction)
        |    |    |      T: a T junction
        T----X----T      X: a 4-way junction
        |    |    |
        B----T----B

    A street is a road whose lane -1 runs east or south and lane 1 back. Inside a junction
    (`junction_half_m` from its centre to each side) every arm leads to every other arm, one
    road each: straight, a right turn (radius junction_half - lane / 2) or a left turn
    (junction_half + lane / 2). Spawn points: 10 m into each street lane and 10 m before its end."""
    half, w = junction_half_m, LANE_WIDTH
    cells = [(i, j) for j in range(3) for i in range(3)]
    road_ids = itertools.count()

    def lane(v, c, along, length, curvature=0.0, is_junction=False):
        """A lane driving along v, starting `along` v from junction c's centre, right of its middle."""
        start = (c[0] * block_m + along * v[0] - v[1] * w / 2, c[1] * block_m + along * v[1] + v[0] * w / 2)
        yaw = math.degrees(math.atan2(v[1], v[0]))
        return Lane((next(road_ids), 0, -1), start, yaw, length, curvature, is_junction)

    leaving, arriving, lanes = {}, {}, []  # (junction, arm) -> the street lane out of it, into it
    for c in cells:
        for arm, back in (("E", "W"), ("S", "N")):
            v, u = GRID_DIRECTIONS[arm], GRID_DIRECTIONS[back]
            other = (c[0] + v[0], c[1] + v[1])
            if other in cells:
                there, home = lane(v, c, half, block_m - 2 * half), lane(u, other, half, block_m - 2 * half)
                home.road_id, home.lane_id = there.road_id, 1  # one road, its lane 1 driven back
                leaving[c, arm] = arriving[other, back] = there
                leaving[other, back] = arriving[c, arm] = home
                lanes += [there, home]
    spawns = [(street, s) for street in lanes for s in (10.0, street.length - 10.0)]
    for c in cells:
        arms = [a for a in GRID_DIRECTIONS if (c, a) in leaving]
        for arm_in, arm_out in itertools.permutations(arms, 2):
            u, v = tuple(-x for x in GRID_DIRECTIONS[arm_in]), GRID_DIRECTIONS[arm_out]  # driving in, out
            turn = u[0] * v[1] - u[1] * v[0]  # 1: a right turn, -1: a left one
            radius = half - turn * w / 2
            length = 2 * half if turn == 0 else radius * math.pi / 2
            connector = lane(u, c, -half, length, turn / radius, is_junction=len(arms) > 2)
            arriving[c, arm_in].successors.append(connector)
            connector.successors = [leaving[c, arm_out]]
            lanes.append(connector)
    return lanes, spawns


class Waypoint:
    def __init__(self, lane: Lane, s: float):
        self._lane, self.s = lane, s
        self.road_id, self.section_id, self.lane_id = lane.road_id, lane.section_id, lane.lane_id
        self.is_junction, self.lane_width = lane.is_junction, LANE_WIDTH
        x, y, yaw = lane.pose(s)
        self.transform = Transform(Location(x, y, 0.0), Rotation(yaw=yaw))

    def next(self, distance):
        """Waypoints `distance` further along the lane; past its end, one on each lane it leads to
        (several at a junction's entry, none at a dead end)."""
        _boost("Waypoint.next", distance=(distance, float))
        return [Waypoint(lane, s) for lane, s in self._lane.advance(self.s, distance)]


class Map:
    def __init__(self, town: str, network=None):
        self.name = f"Carla/Maps/{town}"
        self.lanes, self._spawns = network or straight_road()

    def get_spawn_points(self):
        points = []
        for lane, s in self._spawns:
            x, y, yaw = lane.pose(s)
            points.append(Transform(Location(x, y, 0.3), Rotation(yaw=yaw)))
        return points

    def get_waypoint(self, location, project_to_road=True):
        """The nearest lane's waypoint; without projecting, None off every lane."""
        places = (lane.project(location.x, location.y) for lane in self.lanes)
        distance, i, s = min((d, i, s) for i, (s, d) in enumerate(places))
        if not project_to_road and distance > LANE_WIDTH / 2:
            return None
        return Waypoint(self.lanes[i], s)

    def get_topology(self):
        """(entry, exit) per lane and lane it leads to: the entry at the lane's start, the exit at
        the start of the next lane (where this one ends); a dead end's exit is its own end."""
        return [(Waypoint(lane, 0.0), Waypoint(after, 0.0) if after is not None else Waypoint(lane, lane.length))
                for lane in self.lanes for after in (lane.successors or [None])]


class Actor:
    def __init__(self, world, actor_id, type_id, transform, parent=None, attributes=None):
        self.world, self.id, self.type_id, self.parent = world, actor_id, type_id, parent
        self.attributes = attributes or {}
        self._transform = Transform(Location(**vars(transform.location)), Rotation(**vars(transform.rotation)))
        self.speed, self.control = 0.0, VehicleControl()
        self.autopilot_port: int | None = None
        self.in_snapshot = False  # the client knows an actor's state from the next tick on
        self.is_alive = True

    def get_transform(self):
        if self.parent is not None:
            return self.parent.get_transform()
        if not self.in_snapshot:
            return Transform()  # real CARLA: a default ActorSnapshot (carla#1424)
        t = self._transform
        return Transform(Location(t.location.x, t.location.y, t.location.z), Rotation(yaw=t.rotation.yaw))

    def get_location(self):
        return self.get_transform().location

    def get_velocity(self):
        if not self.in_snapshot:
            return Vector3D()
        yaw = math.radians(self._transform.rotation.yaw)
        return Vector3D(self.speed * math.cos(yaw), self.speed * math.sin(yaw), 0.0)

    def apply_control(self, control):
        if not isinstance(control, VehicleControl):
            raise TypeError("apply_control needs a carla.VehicleControl")
        self.control = control

    def set_autopilot(self, enabled=True, tm_port=8000):
        _boost("Vehicle.set_autopilot", tm_port=(tm_port, int))
        self.autopilot_port = tm_port if enabled else None

    def destroy(self):
        return self.world._destroy(self.id)


class WalkerAIController(Actor):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.running, self.destination, self.max_speed = False, None, None

    def start(self):
        if self.parent is None or not self.parent.in_snapshot:
            raise RuntimeError("the walker of this controller is not in the episode yet: tick first")
        self.running = True

    def go_to_location(self, destination):
        if not isinstance(destination, Vector3D):
            raise TypeError(
                "Python argument types in\n    WalkerAIController.go_to_location(WalkerAIController, "
                f"{type(destination).__name__})\ndid not match C++ signature"
            )
        self.destination = destination

    def set_max_speed(self, speed):
        _boost("WalkerAIController.set_max_speed", speed=(speed, float))
        self.max_speed = speed

    def stop(self):
        self.running = False


class Sensor(Actor):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._callback = None
        self.rendered = 0  # frames this camera has rendered

    def is_listening(self):  # a method in 0.9.16, not a property
        return self._callback is not None

    def listen(self, callback):
        self._callback = callback

    def stop(self):
        self._callback = None


class _Streaming:
    """The client's streaming threads: callbacks run here, in delivery order, after `tick()`
    has possibly returned. Each item is delivered `delay_s` after it was queued."""

    def __init__(self):
        self._heap: list = []
        self._counter = itertools.count()
        self._cv = threading.Condition()
        threading.Thread(target=self._run, daemon=True, name="fake-carla-streaming").start()

    def deliver(self, sensor: Sensor, data, delay_s: float = 0.0) -> None:
        with self._cv:
            heapq.heappush(self._heap, (time.monotonic() + delay_s, next(self._counter), sensor, data))
            self._cv.notify()

    def _run(self):
        while True:
            with self._cv:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cv.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _, sensor, data = heapq.heappop(self._heap)
            callback = sensor._callback
            if callback is not None:
                callback(data)


class World:
    def __init__(self, client, town):
        self.client, self.map, self.settings = client, Map(town, client.fake.network()), WorldSettings()
        self.actors: dict[int, Actor] = {}
        self.frame, self._next_id, self.weather = 0, 100, None
        self.delta_seconds = 0.0  # the last tick's (the snapshot's timestamp)
        self.pedestrians_seed = None
        # Faults and events a test sets:
        self.drop_camera_frames: set[int] = set()
        self.drop_sensor_frames: dict[int, set[int]] = {}  # sensor id -> frames it drops
        self.late_frames: set[int] = set()  # images that arrive after the next frame's
        self.first_images_missed = 0  # the images each new camera renders before its first that comes
        self.collisions: dict[int, int] = {}  # frame -> collision events on that frame
        self.collision_delay_ticks = 0  # events reach the client this many ticks late
        self.image_delay_s = 0.0  # every image reaches the client this long after its tick
        self._held_images: dict[int, list] = {}  # sensor id -> its images held back (late frames)
        self._pending_collisions: list[tuple] = []  # (deliver at frame, event frame, other actor)
        self._navigation_calls = 0
        self._streaming = _Streaming()
        self.map_actor_ids = self._place_map_actors()

    def _place_map_actors(self) -> set[int]:
        """The map's traffic lights and signs, beside the road (a car hits their poles only off
        it): the real `get_actors()` lists them with everyone's actors, hundreds in a town."""
        placed = set()
        for n, spawn in enumerate(self.map.get_spawn_points()):
            yaw = math.radians(spawn.rotation.yaw)
            right = (-math.sin(yaw), math.cos(yaw))  # CARLA's y points right of x
            for side, offset in itertools.product((1.0, -1.0), (2.0, 3.0, 4.0)):
                at = Location(spawn.location.x + side * offset * LANE_WIDTH * right[0],
                              spawn.location.y + side * offset * LANE_WIDTH * right[1], 0.0)
                if self.map.get_waypoint(at, project_to_road=False) is None:
                    kind = "traffic.stop" if n % 3 == 2 else "traffic.traffic_light"
                    actor = Actor(self, len(placed) + 1, kind, Transform(at, Rotation(yaw=spawn.rotation.yaw)))
                    actor.in_snapshot = True
                    self.actors[actor.id] = actor
                    placed.add(actor.id)
                    break
        return placed

    def spawned_actors(self) -> dict[int, "Actor"]:
        """The actors clients spawned: all but the map's."""
        return {i: a for i, a in self.actors.items() if i not in self.map_actor_ids}

    # --- API used by carla_env
    def get_map(self):
        return self.map

    def get_settings(self):
        self.client._remote("settings")
        s = self.settings
        return WorldSettings(s.synchronous_mode, s.no_rendering_mode, s.fixed_delta_seconds)

    def apply_settings(self, settings, seconds=0.0):
        """As LibCarla's World::ApplySettings: with a fixed delta, the client ticks the world
        until two snapshots in a row show it (up to 30 ticks), under the same timeout as a tick."""
        self.client._remote("settings")
        self.settings = WorldSettings(settings.synchronous_mode, settings.no_rendering_mode, settings.fixed_delta_seconds)
        frame, correct = self.frame, 0
        for _ in range(30 if settings.fixed_delta_seconds is not None else 0):
            correct += abs(settings.fixed_delta_seconds - self.delta_seconds) < FLOAT_EPSILON
            if correct >= 2:
                break
            self.tick(seconds)
        return frame

    def set_weather(self, weather):
        self.weather = weather

    def set_pedestrians_seed(self, seed):
        """Seeds the navigation's random points, as in CARLA (generate_traffic.py relies on it)."""
        _boost("World.set_pedestrians_seed", seed=(seed, int))
        self.pedestrians_seed, self._navigation_calls = seed, 0

    def get_blueprint_library(self):
        return BlueprintLibrary()

    def get_random_location_from_navigation(self):
        self._navigation_calls += 1
        if self._navigation_calls % 4 == 0:
            return None  # boost::optional: no point found
        offset = (self.pedestrians_seed or 0) % 5  # on the sidewalk, 7 m apart, where the seed says
        return Location(7.0 * self._navigation_calls + offset, -3.0, 0.0)

    def try_spawn_actor(self, blueprint, transform, attach_to=None):
        if attach_to is None and any(self._occupied(transform, a) for a in self.actors.values()):
            return None
        return self._spawn(blueprint, transform, attach_to)

    def spawn_actor(self, blueprint, transform, attach_to=None):
        actor = self.try_spawn_actor(blueprint, transform, attach_to)
        if actor is None:
            raise RuntimeError("Spawn failed because of collision at spawn position")
        return actor

    def get_actors(self, ids=None):
        if ids is not None:
            for i in ids:
                _boost("World.get_actors", actor_id=(i, int))
        return [a for i, a in self.actors.items() if ids is None or i in ids]

    def get_snapshot(self):
        self.client._remote("settings")
        return SimpleNamespace(frame=self.frame)

    def tick(self, seconds=0.0):
        _boost("World.tick", seconds=(seconds, float))
        # The tick cue is an RPC under the client's timeout; `seconds` bounds only the wait for
        # the frame's snapshot, which the double has at once.
        self.frame = int(self.client._remote("tick")) if self.client.tcp else self.frame + 1
        self.client.fake._tick_traffic_managers()
        dt = self.delta_seconds = self.settings.fixed_delta_seconds or 0.05
        ego = self.ego()
        before = ego._transform.location.y if ego is not None else None
        for actor in list(self.actors.values()):
            if actor.type_id.startswith("vehicle.") and actor.parent is None:
                self._move(actor, dt)
            elif isinstance(actor, WalkerAIController) and actor.running and actor.destination is not None:
                self._walk(actor.parent, actor.destination, actor.max_speed or 1.0, dt)
            actor.in_snapshot = True
        touched = []  # one event per frame in contact with anything solid
        solid = ("vehicle.", "static.", "walker.", "traffic.")  # a traffic light's pole too
        for other in self.actors.values() if ego is not None else ():
            if other is not ego and other.parent is None and other.type_id.startswith(solid):
                p, q = ego._transform.location, other._transform.location
                if math.dist((p.x, p.y), (q.x, q.y)) < CONTACT_M:
                    touched.append(other)
        if ego is not None and self._off_the_road(ego._transform.location):
            touched.append(CURB)
        if touched:
            self.collisions[self.frame] = self.collisions.get(self.frame, 0) + len(touched)
        self._deliver_sensor_data(ego, before, touched)
        return self.frame

    # --- inside the double
    def _spawn(self, blueprint, transform, parent=None):
        if blueprint.id.startswith("sensor."):
            cls = Sensor
        elif blueprint.id == "controller.ai.walker":
            cls = WalkerAIController
        else:
            cls = Actor
        actor = cls(self, self._next_id, blueprint.id, transform, parent, dict(blueprint.attributes))
        self.actors[actor.id], self._next_id = actor, self._next_id + 1
        return actor

    def _destroy(self, actor_id):
        actor = self.actors.pop(actor_id, None)
        if actor is not None:
            actor.is_alive = False
        return actor is not None

    def _off_the_road(self, location) -> bool:
        return min(lane.project(location.x, location.y)[1] for lane in self.map.lanes) > CURB_M

    @staticmethod
    def _occupied(transform, actor):
        p = actor._transform.location
        return math.dist((p.x, p.y), (transform.location.x, transform.location.y)) < 2.0

    def _move(self, car, dt):
        if car.autopilot_port is not None:  # the Traffic Manager keeps its lane
            tm = self.client.fake.traffic_managers.get(car.autopilot_port)
            car.speed = NPC_SPEED_MPS if tm is not None and tm.synchronous else 0.0
            car._transform.rotation.yaw = self.map.get_waypoint(car._transform.location).transform.rotation.yaw
        else:  # a kinematic bicycle: steer 1 turns the front wheels MAX_STEER_DEG
            c = car.control
            car.speed = max(0.0, car.speed + (4.0 * c.throttle - 8.0 * c.brake) * dt)
            yaw_rate = car.speed * math.tan(math.radians(MAX_STEER_DEG * c.steer)) / WHEELBASE_M
            car._transform.rotation.yaw += math.degrees(yaw_rate * dt)
        yaw = math.radians(car._transform.rotation.yaw)
        car._transform.location.x += car.speed * math.cos(yaw) * dt
        car._transform.location.y += car.speed * math.sin(yaw) * dt

    @staticmethod
    def _walk(walker, destination, speed, dt):
        p = walker._transform.location
        dx, dy = destination.x - p.x, destination.y - p.y
        distance = math.hypot(dx, dy)
        if distance > 1e-6:
            step = min(distance, speed * dt)
            p.x, p.y = p.x + dx / distance * step, p.y + dy / distance * step

    def ego(self):
        return next((a for a in self.actors.values() if str(a.attributes.get("role_name", "")) == "hero"), None)

    def _deliver_sensor_data(self, ego, y_before, touched):
        sensors = [a for a in self.actors.values() if isinstance(a, Sensor) and a.is_listening()]
        for sensor in sensors:
            if sensor.type_id == "sensor.camera.rgb":
                image = self._image(sensor, ego)
                held = self._held_images.pop(sensor.id, [])
                sensor.rendered += 1
                if sensor.rendered <= self.first_images_missed:
                    pass  # rendering warming up: no image
                elif self.frame in self.late_frames:
                    self._held_images[sensor.id] = [image]
                elif self.frame not in self.drop_camera_frames | self.drop_sensor_frames.get(sensor.id, set()):
                    self._streaming.deliver(sensor, image, self.image_delay_s)
                for late in held:
                    self._streaming.deliver(sensor, late, self.image_delay_s)
            elif sensor.type_id == "sensor.other.collision":
                # The actors touched this frame, then (events a test adds) the world's geometry.
                others = touched + [WORLD_GEOMETRY] * (self.collisions.get(self.frame, 0) - len(touched))
                for other in others:
                    self._pending_collisions.append((self.frame + self.collision_delay_ticks, self.frame, other))
                due = [p for p in self._pending_collisions if p[0] <= self.frame]
                self._pending_collisions = [p for p in self._pending_collisions if p[0] > self.frame]
                for _, event_frame, other in due:
                    event = SimpleNamespace(frame=event_frame, actor=sensor.parent, other_actor=other,
                                            normal_impulse=Vector3D(1000.0, 0.0, 0.0))
                    self._streaming.deliver(sensor, event)
            elif sensor.type_id == "sensor.other.lane_invasion" and ego is not None:
                # Client-side sensor: its callback runs in the ticking thread.
                lane_of = [math.floor((y + LANE_WIDTH / 2) / LANE_WIDTH) for y in (y_before, ego._transform.location.y)]
                if lane_of[0] != lane_of[1]:
                    sensor._callback(SimpleNamespace(frame=self.frame, actor=ego, crossed_lane_markings=[]))

    def _image(self, sensor, ego):
        w, h = int(sensor.attributes["image_size_x"]), int(sensor.attributes["image_size_y"])
        # A picture that depends on where the car is, so that a stale image would show.
        shade = int(ego._transform.location.x * 10) % 200 if ego is not None else 0
        bgra = np.full((h, w, 4), shade, np.uint8)
        bgra[:, : w // 2, 2] = 255  # red left half (BGRA: index 2 is red)
        return SimpleNamespace(frame=self.frame, width=w, height=h, raw_data=bgra.tobytes())


class TrafficManager:
    """One per port per process; its thread calls the server of the client that created it."""

    def __init__(self, fake, client, port):
        self.fake, self.client, self.port = fake, client, port
        self.synchronous, self.seed, self.alive = False, None, True
        # Its RPC server listens on the port, in the client's process. If another process's
        # Traffic Manager holds it, CARLA makes this one that one's remote client.
        self._listener, self.remote = None, False
        if fake.tcp:
            try:
                self._listener = socket.create_server(("127.0.0.1", port))
            except OSError:
                self.remote = True

    def set_synchronous_mode(self, on):
        self.synchronous = on  # a flag inside the client process: no call to the server

    def set_random_device_seed(self, seed):
        _boost("TrafficManager.set_random_device_seed", seed=(seed, int))
        self.client._remote("tm")  # resets the traffic lights of its world
        self.seed = seed

    def get_port(self):
        return self.port

    def shut_down(self):
        self.client._remote("tm")  # DestroyTrafficManager RPC: needs a live server
        self.fake.traffic_managers.pop(self.port, None)
        self.alive = False
        if self._listener is not None:
            self._listener.close()

    def _tick(self):
        try:
            self.client._remote("tm")
        except RuntimeError:
            # TrafficManagerLocal::Run has no try/catch: std::terminate.
            os.write(2, f"terminate called: traffic manager on port {self.port} lost its server\n".encode())
            os.abort()


class _SpawnActor:
    def __init__(self, blueprint=None, transform=None, parent_id=None):
        if parent_id is not None:
            _boost("SpawnActor.__init__", parent_id=(parent_id, int))
        self.blueprint, self.transform, self.parent_id = blueprint, transform, parent_id
        self.attachment_type, self.socket_name, self._then = "Rigid", "", []

    def then(self, command):
        spawn = _SpawnActor(self.blueprint, self.transform, self.parent_id)
        spawn._then = [*self._then, command]
        return spawn


class _SetAutopilot:
    def __init__(self, actor, enabled, tm_port=8000):
        _boost("SetAutopilot.__init__", tm_port=(tm_port, int))
        self.actor_id, self.enabled, self.tm_port = actor, enabled, tm_port


class _DestroyActor:
    def __init__(self, actor):
        _boost("DestroyActor.__init__", actor_id=(actor, int))
        self.actor_id = actor


class _Response:
    def __init__(self, actor_id=0, error=""):
        self.actor_id, self.error = actor_id, error

    def has_error(self):
        return bool(self.error)


class _Command:
    FutureActor = 0
    SpawnActor = _SpawnActor
    SetAutopilot = _SetAutopilot
    DestroyActor = _DestroyActor
    Response = _Response


class Client:
    def __init__(self, fake, host="127.0.0.1", port=2000, worker_threads=0):
        _boost("Client.__init__", port=(port, int), worker_threads=(worker_threads, int))
        self.fake, self.host, self.port, self.tcp = fake, host, port, fake.tcp
        self.worker_threads = worker_threads
        self.timeout, self._socket, self.world = 5.0, None, None
        self._ever_connected = self._lost = False
        self._lock = threading.Lock()
        fake.clients.append(self)

    def set_timeout(self, seconds):
        _boost("Client.set_timeout", seconds=(seconds, float))
        self.timeout = seconds

    def get_server_version(self):
        self._remote("version")
        return "0.9.16"

    def get_available_maps(self):
        self._remote("maps")
        return list(MAPS)

    def get_world(self):
        """The server's world, the same for every client of this server (the newest drives it)."""
        self._remote("settings")
        worlds = self.fake.worlds
        if (self.host, self.port) not in worlds:
            worlds[self.host, self.port] = World(self, "Town10HD_Opt")  # CARLA's default map
        self.world = worlds[self.host, self.port]
        self.world.client = self
        return self.world

    def load_world(self, map_name, reset_settings=True):
        latency = self.fake.load_world_s
        if latency > self.timeout:
            time.sleep(self.timeout)
            raise RuntimeError("failed to connect to newly created map")
        time.sleep(latency)
        self._remote("settings")
        self.world = self.fake.worlds[self.host, self.port] = World(self, map_name)  # all actors gone, default settings
        return self.world

    def get_trafficmanager(self, port=8000):
        _boost("Client.get_trafficmanager", port=(port, int))
        tm = self.fake.traffic_managers.get(port)
        if tm is None:  # the constructor only creates one `if (!GetTM(port))`
            tm = self.fake.traffic_managers[port] = TrafficManager(self.fake, self, port)
        return tm

    def apply_batch_sync(self, commands, do_tick=False):
        responses = []
        for command in commands:
            if isinstance(command, _DestroyActor):
                ok = self.world._destroy(command.actor_id)
                responses.append(_Response(command.actor_id, "" if ok else f"actor {command.actor_id} not found"))
                continue
            parent = None
            if command.parent_id is not None:
                parent = self.world.actors.get(command.parent_id)
                if parent is None:
                    responses.append(_Response(0, f"parent {command.parent_id} not found"))
                    continue
            actor = self.world.try_spawn_actor(command.blueprint, command.transform, parent)
            if actor is None:
                responses.append(_Response(0, "Spawn failed because of collision at spawn position"))
                continue
            for then in command._then:
                if isinstance(then, _SetAutopilot):
                    actor.set_autopilot(then.enabled, then.tm_port)
            responses.append(_Response(actor.id, ""))
        if do_tick:
            self.world.tick()
        return responses

    # --- talking to the stand-in server process
    def _remote(self, request: str) -> str:
        """One RPC under the client's timeout. rpclib fails a call only at its timeout: a
        refused, reset or closed connection is noticed then, not at once."""
        if not self.tcp:
            return ""
        timeout_s, deadline = self.timeout, time.monotonic() + self.timeout
        message = (
            f"time-out of {int(timeout_s * 1000)}ms while waiting for the simulator, make sure the "
            f"simulator is ready and connected to {self.host}:{self.port}"
        )
        with self._lock:
            if self._lost:  # rpclib does not reconnect a client whose server went away
                self._wait_until(deadline)
                raise RuntimeError(f"{message} (connection lost)")
            try:
                if self._socket is None:
                    self._socket = socket.create_connection((self.host, self.port), timeout=timeout_s)
                    self._lines = self._socket.makefile("rb")
                    self._ever_connected = True  # from now on, losing the connection is for good
                self._socket.settimeout(max(deadline - time.monotonic(), 0.001))
                self._socket.sendall(f"{request}\n".encode())
                line = self._lines.readline()
            except OSError as e:  # refused, reset, or socket.timeout
                self._lose_connection()
                self._wait_until(deadline)
                raise RuntimeError(f"{message} ({e})") from None
            if not line:
                self._lose_connection()
                self._wait_until(deadline)
                raise RuntimeError(f"{message} (connection closed)")
        return line.decode().strip()

    @staticmethod
    def _wait_until(deadline: float) -> None:
        time.sleep(max(deadline - time.monotonic(), 0.0))

    def _lose_connection(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._lost = self._ever_connected


class FakeCarla:
    """Use as the `carla` module: `CarlaSimulator(..., carla_module=FakeCarla())`. One instance
    stands for one process's `carla` module: its Traffic Managers are that process's."""

    WeatherParameters = WeatherParameters
    WorldSettings = WorldSettings
    Transform, Location, Rotation, Vector3D = Transform, Location, Rotation, Vector3D
    VehicleControl = VehicleControl
    command = _Command

    def __init__(self, tcp: bool = False, load_world_s: float = 0.0, ring_radius: float | None = None,
                 grid_block_m: float | None = None):
        """The map is the straight road, or `ring_road(ring_radius)`, or `grid_town(grid_block_m)`."""
        self.tcp, self.load_world_s, self.ring_radius, self.grid_block_m = tcp, load_world_s, ring_radius, grid_block_m
        self.clients: list[Client] = []
        self.traffic_managers: dict[int, TrafficManager] = {}
        self.worlds: dict[tuple[str, int], World] = {}  # per server (in memory; tcp: per process)

    def Client(self, host="127.0.0.1", port=2000, worker_threads=0):
        return Client(self, host, port, worker_threads)

    def network(self) -> tuple[list[Lane], list[tuple[Lane, float]]]:
        if self.grid_block_m:
            return grid_town(self.grid_block_m)
        return ring_road(self.ring_radius) if self.ring_radius else straight_road()

    def _tick_traffic_managers(self):
        for tm in list(self.traffic_managers.values()):
            tm._tick()

    @property
    def world(self) -> World:
        return self.clients[-1].world

    def __getstate__(self):  # sent to a client process: a fresh module there
        return {"tcp": self.tcp, "load_world_s": self.load_world_s, "ring_radius": self.ring_radius,
                "grid_block_m": self.grid_block_m}

    def __setstate__(self, state):
        self.__init__(**state)


def tcp_carla() -> FakeCarla:
    """`--carla-module tests.fake_carla:tcp_carla`: the double, talking to a stand-in server."""
    return FakeCarla(tcp=True)


def tcp_carla_ring() -> FakeCarla:
    """The same on a map with no straight road: every spawn point is on a curve."""
    return FakeCarla(tcp=True, ring_radius=12.0)
