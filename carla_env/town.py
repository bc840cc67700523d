"""The embedded town: a grid of two-way streets with junctions, bends and traffic, on highway-env.

    grid 3:   B----T----B      B: a 90-degree bend (two arms)
              |    |    |      T: a T junction (three arms)
              T----X----T      X: a 4-way junction
              |    |    |
              B----T----B

Every street is two-way, one lane each way (right-hand traffic). Inside a junction each arm
connects to every other arm (no U-turns): straight, right (radius junction_half - lane/2) and
left (junction_half + lane/2) turns; east-west streets have the right of way. Each episode the
ego car gets a route planned on the network (Dijkstra over lane lengths) with at least
`route_min_turns` turns at junctions; NPC cars (highway-env's IDM drivers) follow routes of their
own to random destinations and yield by highway-env's priority rule (`_yielding`: RegulatedRoad's
rule, computed without its per-pair copies of the cars).

gymnasium id `carla_env:EmbeddedTown-v0`; kwargs: carla_env/config.py `EmbeddedTownConfig`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from carla_env.config import EmbeddedTownConfig, load_env_config
from carla_env.contract import Measurements
from carla_env.driving_env import DrivingEnv
from carla_env.embedded import HighwayEnvSimulator, no_reverse
from carla_env.route import Route, path_to, shortest_paths

DIRECTIONS = {"E": (1.0, 0.0), "S": (0.0, 1.0), "W": (-1.0, 0.0), "N": (0.0, -1.0)}  # screen: y down
OPPOSITE = {"E": "W", "W": "E", "N": "S", "S": "N"}
ROUTE_SPACING_M = 0.5
START_M = 5.0  # the ego car starts this far into its route's first street
NPC_CLEARANCE_M = 15.0  # between spawned cars
EGO_CLEARANCE_M = 35.0  # no NPC is spawned closer than this to the ego car
NPC_MAX_STOP_S = 8.0  # an NPC standing still this long is gridlocked: towed away, replaced
# Right of way: cars whose constant-velocity paths come within a car length in the next few
# seconds, and that are not simply following each other, are in conflict; the one on the lower
# priority lane (or, equal, the one behind) stops for it (highway-env's RegulatedRoad rule,
# without its per-pair deep copies of the cars, which cost 70% of a step).
CONFLICT_TIMES_S = np.arange(0.25, 3.0, 0.25)
CONFLICT_DISTANCE_M = 3.0  # under the 4 m between two oncoming lanes' centres
FOLLOWING_HEADING_RAD = math.radians(20.0)
LANE_BOX_MARGIN_M = 6.0
WRONG_LANE_MARGIN_M = 0.5  # beyond the route's lane edge, as CARLA's OutsideRouteLanesTest allows
CROSSING_TIMES_S = (0.0, 0.5, 1.0, 1.5, 2.0)  # see TownSimulator._front_vehicle


def _right(v: np.ndarray) -> np.ndarray:
    return np.array([-v[1], v[0]])


@dataclass(frozen=True)
class Town:
    """The road network and what each lane is: a street or a junction's movement."""

    network: Any  # highway_env.road.road.RoadNetwork
    junctions: dict[str, str]  # junction name -> "4-way", "T" or "bend"
    movements: dict[tuple[str, str], tuple[str, str]]  # connector (from, to) -> (junction, maneuver)
    streets: list[tuple[str, str]]  # every street lane (from, to)


def build_town(config: EmbeddedTownConfig) -> Town:
    from highway_env.road.lane import LineType, StraightLane
    from highway_env.road.road import RoadNetwork

    n, w, limit = config.grid, config.lane_width_m, config.speed_limit_mps
    cells = {(i, j) for i in range(n) for j in range(n)}
    name = {c: f"J{c[0]}{c[1]}" for c in cells}
    centre = {c: np.array(c, float) * config.block_m for c in cells}
    arms = {c: [d for d, (dx, dy) in DIRECTIONS.items() if (c[0] + int(dx), c[1] + int(dy)) in cells] for c in cells}
    kind = {c: {4: "4-way", 3: "T", 2: "bend"}[len(arms[c])] for c in cells}
    half = {c: config.bend_half_m if kind[c] == "bend" else config.junction_half_m for c in cells}

    net, movements, streets = _indexed_network_class(RoadNetwork)(), {}, []
    for c in cells:
        for d in arms[c]:
            v = np.array(DIRECTIONS[d])
            other = (c[0] + int(v[0]), c[1] + int(v[1]))
            start = centre[c] + v * half[c] + _right(v) * w / 2
            end = centre[other] - v * half[other] + _right(v) * w / 2
            lane = StraightLane(start, end, width=w, line_types=(LineType.STRIPED, LineType.CONTINUOUS),
                                priority=2 if d in "EW" else 1, speed_limit=limit)
            street = (f"{name[c]}:out{d}", f"{name[other]}:in{OPPOSITE[d]}")
            net.add_lane(*street, lane)
            streets.append(street)
        for arm_in in arms[c]:
            u = -np.array(DIRECTIONS[arm_in])  # travel direction of a car arriving from arm_in
            entry = centre[c] - u * half[c] + _right(u) * w / 2
            for arm_out in arms[c]:
                if arm_out == arm_in:
                    continue
                v = np.array(DIRECTIONS[arm_out])
                exit_ = centre[c] + v * half[c] + _right(v) * w / 2
                turn = u[0] * v[1] - u[1] * v[0]  # > 0: right turn (y points down)
                maneuver = "straight" if abs(turn) < 0.5 else "right" if turn > 0 else "left"
                priority = (2 if arm_in in "EW" else 1) - (maneuver == "left")
                lane = _movement_lane(entry, exit_, u, v, maneuver, kind[c] == "bend", w, priority, limit)
                link = (f"{name[c]}:in{arm_in}", f"{name[c]}:out{arm_out}")
                net.add_lane(*link, lane)
                movements[link] = (name[c], maneuver)
    net.index_lanes()
    return Town(net, {name[c]: kind[c] for c in cells}, movements, sorted(streets))


def _movement_lane(entry, exit_, u, v, maneuver: str, bend: bool, width: float, priority: int, speed_limit: float):
    """The lane through a junction from `entry` (travelling along u) to `exit_` (along v): a
    straight line, or a quarter circle about the corner both stop lines point at."""
    from highway_env.road.lane import CircularLane, LineType, StraightLane

    if maneuver == "straight":
        return StraightLane(entry, exit_, width=width, line_types=(LineType.NONE, LineType.NONE), priority=priority,
                            speed_limit=speed_limit)
    radius = float(np.dot(exit_ - entry, u))
    pivot = entry + radius * v
    start_phase = math.atan2(*(entry - pivot)[::-1])
    # Clockwise (a right turn, y pointing down) the phase grows; anticlockwise it shrinks.
    end_phase = start_phase + (math.pi / 2 if maneuver == "right" else -math.pi / 2)
    # Painted: a bend's centre line (by its outer lane) and kerbs; a junction's right-turn kerb.
    left = LineType.STRIPED if bend and maneuver == "left" else LineType.NONE
    right = LineType.CONTINUOUS if bend or maneuver == "right" else LineType.NONE
    return CircularLane(pivot, radius, start_phase, end_phase, clockwise=maneuver == "right", width=width,
                        line_types=(left, right), priority=priority, speed_limit=speed_limit)


def _indexed_network_class(base: type) -> type:
    class IndexedRoadNetwork(base):
        """highway-env's RoadNetwork with a bounding-box prefilter on the closest-lane search:
        every car asks it at every physics step, and the town has 68 lanes."""

        def index_lanes(self) -> None:
            self._indexes, boxes = [], []
            for _from, tos in self.graph.items():
                for _to, lanes in tos.items():
                    for i, lane in enumerate(lanes):
                        pts = np.array([lane.position(x, 0.0) for x in np.linspace(0.0, lane.length, 9)])
                        boxes.append((pts.min(0) - LANE_BOX_MARGIN_M, pts.max(0) + LANE_BOX_MARGIN_M))
                        self._indexes.append((_from, _to, i))
            self._lo, self._hi = (np.array(b) for b in zip(*boxes))

        def get_closest_lane_index(self, position, heading=None):
            near = np.flatnonzero(np.all((self._lo <= position) & (position <= self._hi), axis=1))
            candidates = [self._indexes[k] for k in near] or self._indexes
            return min(candidates, key=lambda index: self.get_lane(index).distance_with_heading(position, heading))

    return IndexedRoadNetwork


def shortest_route(town: Town, start: tuple[str, str], goal: tuple[str, str]) -> list[tuple[str, str]]:
    """The shortest lane sequence (Dijkstra over lane lengths) from street `start` to street `goal`."""
    graph = town.network.graph
    _, came_by = shortest_paths(start[1], 0.0, lambda node: (
        ((node, nxt), nxt, lanes[0].length) for nxt, lanes in graph.get(node, {}).items()))
    return [start, *path_to(came_by, goal[0]), goal] if goal[0] in came_by else []


def junction_turns(town: Town, lanes: list[tuple[str, str]]) -> int:
    """Left and right turns made inside junctions (a bend is not a junction)."""
    return sum(1 for lane in lanes if lane in town.movements and town.movements[lane][1] != "straight"
               and town.junctions[town.movements[lane][0]] != "bend")


def plan_route(town: Town, config: EmbeddedTownConfig, rng: np.random.Generator,
               tries: int = 500) -> list[tuple[str, str]]:
    """A random route between two streets with enough turns at junctions and the right length."""
    for _ in range(tries):
        start, goal = (town.streets[i] for i in rng.choice(len(town.streets), 2, replace=False))
        lanes = shortest_route(town, start, goal)
        length = sum(town.network.get_lane((*lane, 0)).length for lane in lanes) - START_M
        if (lanes and junction_turns(town, lanes) >= config.route_min_turns
                and config.route_min_m <= length <= config.route_max_m):
            return lanes
    raise RuntimeError(
        f"no route of {config.route_min_m:g}-{config.route_max_m:g} m with {config.route_min_turns} turns "
        f"at junctions in a {config.grid}x{config.grid} town of {config.block_m:g} m blocks: "
        "widen env.kwargs.route_min_m/route_max_m or enlarge the town"
    )


def route_centre_line(town: Town, lanes: list[tuple[str, str]]) -> np.ndarray:
    points = []
    for i, lane_id in enumerate(lanes):
        lane = town.network.get_lane((*lane_id, 0))
        s = np.arange(START_M if i == 0 else 0.0, lane.length, ROUTE_SPACING_M)
        points.extend(lane.position(x, 0.0) for x in s)
    last = town.network.get_lane((*lanes[-1], 0))
    points.append(last.position(last.length, 0.0))
    return np.array(points)


class TownSimulator(HighwayEnvSimulator):
    def __init__(self, config: EmbeddedTownConfig):
        self.config = config
        self.town = build_town(config)
        self._rng = np.random.default_rng()
        self.route: Route | None = None
        self.route_lanes: list[tuple[str, str]] = []
        super().__init__(config, _town_world_class(self), {"centering_position": [0.5, 0.5], "screen_width": 400,
                                                            "screen_height": 400, "scaling": 3.0})

    # --- called by the highway-env world at each reset and step ---

    def populate(self, world) -> None:
        """A fresh road on the town's network, the ego car at its route's start, the traffic."""
        from highway_env.road.road import Road

        self._rng = np.random.default_rng(world.np_random.integers(2**63))
        # Connected lanes: an NPC keeps its gap to a car on the junction lane it drives into.
        world.road = Road(network=self.town.network, np_random=world.np_random,
                          neighbour_vehicles_connected_lanes=True)
        self.route_lanes = plan_route(self.town, self.config, self._rng)
        self.route = Route(route_centre_line(self.town, self.route_lanes))
        first = self.town.network.get_lane((*self.route_lanes[0], 0))
        car_class = no_reverse(world.action_type.vehicle_class, self.config.max_lateral_accel_mps2)
        ego = car_class(world.road, first.position(START_M, 0.0), first.heading_at(START_M),
                        speed=self.config.start_speed_mps)
        world.road.vehicles.append(ego)
        world.vehicle = ego
        world.controlled_vehicles = [ego]
        for _ in range(self.config.npc_vehicles):
            self._spawn_npc(world.road, ego)

    def keep_traffic(self, world) -> None:
        """After each control step: NPCs that crashed into each other or are gridlocked are towed
        away and replaced, NPCs at the end of their route get a new destination, and who yields to whom
        is decided for the next step."""
        road, ego = world.road, world.vehicle
        # Gridlocked NPCs (CARLA's Traffic Manager has the same remedy) are towed away too.
        road.vehicles = [v for v in road.vehicles
                         if v is ego or not (v.crashed or getattr(v, "stopped_s", 0.0) > NPC_MAX_STOP_S)]
        for v in road.vehicles:
            if v is not ego and len(v.route or []) <= 1:
                self._send_somewhere(v)
        for _ in range(self.config.npc_vehicles + 1 - len(road.vehicles)):
            self._spawn_npc(road, ego)
        yielding = _yielding(road.vehicles)
        for v in road.vehicles:
            if v is not ego:
                v.target_speed = 0.0 if v in yielding else self.config.speed_limit_mps

    def _spawn_npc(self, road, ego) -> None:
        street = self.town.streets[self._rng.integers(len(self.town.streets))]
        lane = self.town.network.get_lane((*street, 0))
        s = self._rng.uniform(0.0, lane.length)
        position = lane.position(s, 0.0)
        if np.linalg.norm(position - ego.position) < EGO_CLEARANCE_M or any(
            np.linalg.norm(position - v.position) < NPC_CLEARANCE_M for v in road.vehicles
        ):
            return
        speed = self.config.speed_limit_mps * self._rng.uniform(0.6, 1.0)
        npc = _npc_class().make_on_lane(road, (*street, 0), longitudinal=s, speed=speed)
        npc.target_speed = self.config.speed_limit_mps
        self._send_somewhere(npc)
        road.vehicles.append(npc)

    def _send_somewhere(self, npc) -> None:
        """A route from the lane the NPC drives towards (highway-env's plan_route_to starts from
        the lane it is on, which is stale near a lane's end) to a random street: another one
        than where that lane ends (highway-env's search for a path from a node to itself walks
        every path in the graph)."""
        lane = npc.target_lane_index
        goals = [street for street in self.town.streets if street[1] != lane[1]]
        goal = goals[self._rng.integers(len(goals))]
        path = self.town.network.shortest_path(lane[1], goal[1])
        npc.route = [lane] + [(a, b, None) for a, b in zip(path, path[1:])]

    # --- the Simulator protocol ---

    def _measure(self) -> Measurements:
        car = self._env.unwrapped.vehicle
        route, config = self.route, self.config
        s, lateral = route.locate(car.position)
        front_gap, closing = self._front_vehicle(car, s)
        # Off the road by position alone: highway-env's own `on_road` weighs the heading in, and
        # calls a car that swerves into the oncoming lane, still facing its own, off the road.
        nearest = self.town.network.get_closest_lane_index(car.position)
        off_road = not self.town.network.get_lane(nearest).on_lane(car.position)
        in_junction = nearest[:2] in self.town.movements
        return Measurements(
            speed_mps=float(car.speed),
            lateral_offset_m=lateral,
            heading_error_rad=route.heading_error(car.heading, s),
            lane_width_m=config.lane_width_m,
            lookahead_lateral_m=route.lateral_ahead(car.position, car.heading, s, config.state.lookahead_m),
            front_gap_m=front_gap,
            front_closing_mps=closing,
            collided=bool(car.crashed),
            on_route=abs(lateral) <= config.max_route_deviation_m,
            route_progress_m=route.progress_m,
            route_length_m=route.length_m,
            off_road=off_road,
            # As CARLA's OutsideRouteLanesTest: a margin, and no lanes to be wrong in inside a junction.
            wrong_lane=(not off_road and not in_junction
                        and abs(lateral) > config.lane_width_m / 2 + WRONG_LANE_MARGIN_M),
        )

    def _front_vehicle(self, car, s: float) -> tuple[float, float]:
        """The nearest car ahead on the route, within the gap range: one driving in the route's
        lane, or one that will be in it within CROSSING_TIMES_S at its present velocity (crossing
        or turning into the route at a junction: it then counts as standing where it crosses)."""
        horizon = self.config.state.front_gap_range_m
        gap, closing = math.inf, 0.0
        for other in self._env.unwrapped.road.vehicles:
            if other is car or np.linalg.norm(other.position - car.position) > horizon + car.LENGTH:
                continue
            found = self._on_route_ahead(car, other, s, horizon)
            if found is None:
                continue
            s_other, crossing = found
            d = max(0.0, s_other - s - (car.LENGTH + other.LENGTH) / 2)
            if d < gap:
                along = np.array([math.cos(self.route.heading_at(s_other)), math.sin(self.route.heading_at(s_other))])
                gap = d
                closing = float(np.dot(car.velocity - (0.0 if crossing else other.velocity), along))
        return gap, closing

    def _on_route_ahead(self, car, other, s: float, horizon: float) -> tuple[float, bool] | None:
        """(where along the route, whether only crossing it) `other` is in the route's lane within
        `horizon` metres ahead of s, now or at one of CROSSING_TIMES_S; None if it is not."""
        corridor = (self.config.lane_width_m + car.WIDTH) / 2
        for t in CROSSING_TIMES_S:
            s_other, lateral = self.route.project(other.position + t * other.velocity, s, 0.0, horizon)
            # A car beyond the window projects onto its end: it is not in it.
            if s < s_other < min(s + horizon, self.route.length_m + 1.0) - 1e-6 and abs(lateral) <= corridor:
                return s_other, t > 0.0
        return None

    def view(self) -> np.ndarray:
        """The top-down view around the ego car, with the route ahead drawn in."""
        image = super().view()
        surface = self._env.unwrapped.viewer.sim_surface
        xy = self.route.points[self.route.s >= self.route.progress_m]
        px = ((xy - surface.origin) * surface.scaling).astype(int)
        inside = (px[:, 0] >= 0) & (px[:, 0] < image.shape[1]) & (px[:, 1] >= 0) & (px[:, 1] < image.shape[0])
        image = image.copy()
        image[px[inside, 1], px[inside, 0]] = (40, 200, 255)
        return image


@functools.cache
def _npc_class() -> type:
    from highway_env.vehicle.behavior import IDMVehicle

    class TownCar(no_reverse(IDMVehicle)):
        """highway-env's IDM driver, which never reverses (stopping for a yield, target speed 0,
        makes the IDM brake past zero), and counts how long it has stood still."""

        def step(self, dt: float) -> None:
            super().step(dt)
            self.stopped_s = getattr(self, "stopped_s", 0.0) + dt if abs(self.speed) < 0.1 else 0.0

    return TownCar


def _yielding(vehicles: list) -> set:
    """The cars that must stop for another this step (see CONFLICT_TIMES_S)."""
    position = np.array([v.position for v in vehicles])
    velocity = np.array([v.velocity for v in vehicles])
    paths = position[None] + CONFLICT_TIMES_S[:, None, None] * velocity[None]  # (time, car, xy)
    close = (np.linalg.norm(paths[:, :, None] - paths[:, None], axis=-1) < CONFLICT_DISTANCE_M).any(axis=0)
    heading = np.array([v.heading for v in vehicles])
    turned = np.abs((heading[:, None] - heading[None] + np.pi) % (2 * np.pi) - np.pi) > FOLLOWING_HEADING_RAD
    yielding = set()
    for i, j in zip(*np.nonzero(np.triu(close & turned, 1))):
        a, b = vehicles[i], vehicles[j]
        if a.lane.priority != b.lane.priority:
            yielding.add(a if a.lane.priority < b.lane.priority else b)
        else:
            yielding.add(a if a.front_distance_to(b) > b.front_distance_to(a) else b)
    return yielding


def _town_world_class(simulator: TownSimulator):
    """highway-env's AbstractEnv with the town's road and traffic (imported late: pygame)."""
    from highway_env.envs.common.abstract import AbstractEnv

    class TownWorld(AbstractEnv):

        def _reset(self) -> None:
            simulator.populate(self)

        def step(self, action):
            result = super().step(action)
            simulator.keep_traffic(self)
            return result

        def _reward(self, action) -> float:
            return 0.0  # DrivingEnv owns the reward, termination and time limit

        def _is_terminated(self) -> bool:
            return False

        def _is_truncated(self) -> bool:
            return False

    return TownWorld


class EmbeddedTownEnv(DrivingEnv):
    """gymnasium id `carla_env:EmbeddedTown-v0`; kwargs: EmbeddedTownConfig's fields."""

    def __init__(self, render_mode: str | None = None, **kwargs: Any):
        config = load_env_config(EmbeddedTownConfig, kwargs)
        super().__init__(TownSimulator(config), config, render_mode)
