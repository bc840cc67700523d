"""Routes in the CARLA backend (carla_env/carla_sim.py `RoutePlanner`) and the leaderboard's route
metrics it measures, against the test double's maps (tests/fake_carla.py): the straight road,
the ring, and the grid town of junctions and bends; and, where the real 0.9.16 client is
installed, on an OpenDRIVE T junction that client loads without a server.
"""

import math

import numpy as np
import pytest

from carla_env.carla_sim import ROUTE_SPACING_M, RoutePlanner
from carla_env.contract import wrap_angle
from tests.fake_carla import LANE_WIDTH, MAX_STEER_DEG, WHEELBASE_M, FakeCarla, Location, Rotation, Transform
from tests.test_carla_backend import carla_env

ROADS = {"straight": {}, "ring": {"ring_radius": 12.0}, "grid": {"grid_block_m": 60.0}}
TOWN = {"npc_vehicles": 0, "route_length_m": 150.0, "episode": {"max_seconds": 120.0}}


def grid_env(**config):
    return carla_env(FakeCarla(grid_block_m=60.0), **{**TOWN, **config})


def route_of(env) -> list:
    return env.simulator.client._route


def xy(waypoint) -> np.ndarray:
    return np.array([waypoint.transform.location.x, waypoint.transform.location.y])


def junction_turns(route: list) -> list[str]:
    """What the route does at each junction it drives through: "left", "right" or "straight"."""
    turns, before = [], None
    for a, b in zip(route, route[1:]):
        if b.is_junction and not a.is_junction:
            before = a.transform.rotation.yaw
        elif a.is_junction and not b.is_junction and before is not None:
            change = math.degrees(wrap_angle(math.radians(b.transform.rotation.yaw - before)))
            turns.append("straight" if abs(change) < 45 else "right" if change > 0 else "left")
    return turns


@pytest.mark.parametrize("kind", ROADS)
def test_a_route_is_connected_on_the_road_and_drives_with_its_lanes(kind):
    fake = FakeCarla(**ROADS[kind])
    env = carla_env(fake, **TOWN)
    for seed in range(6):
        env.reset(seed=seed)
        route = route_of(env)
        points = np.array([xy(w) for w in route])
        steps = np.diff(points, axis=0)
        gaps = np.linalg.norm(steps, axis=1)
        # Every spacing along a lane; where one lane leads into the next, between a half and
        # one and a half spacings.
        assert np.all((gaps > 0.5 * ROUTE_SPACING_M) & (gaps <= 1.5 * ROUTE_SPACING_M + 1e-6)), (kind, seed)
        assert all(fake.world.map.get_waypoint(w.transform.location, project_to_road=False) is not None for w in route)
        # Each step goes where its lane goes: never against the traffic, never across the map.
        headings = np.arctan2(steps[:, 1], steps[:, 0])
        lane_yaws = np.radians([w.transform.rotation.yaw for w in route[:-1]])
        assert max(abs(wrap_angle(h - y)) for h, y in zip(headings, lane_yaws)) < math.radians(30)


def test_routes_in_the_grid_town_go_through_junctions_and_turn_there():
    env = grid_env()
    turns = []
    for seed in range(10):
        env.reset(seed=seed)
        route_turns = junction_turns(route_of(env))
        assert route_turns, seed  # every route crosses a junction
        turns += route_turns
    assert {"left", "right"} <= set(turns)


def test_the_destination_is_at_least_the_route_length_away_or_the_farthest_there_is():
    env = grid_env(route_length_m=150.0)
    for seed in range(10):
        env.reset(seed=seed)
        assert env.simulator.client._line.length_m >= 150.0
    # No end of the straight road's lanes is 5 km away: the route goes to the road's end.
    env = carla_env(FakeCarla(), **{**TOWN, "route_length_m": 5000.0})
    for seed in range(3):
        env.reset(seed=seed)
        start, end = xy(route_of(env)[0]), xy(route_of(env)[-1])
        assert end[0] == pytest.approx(1000.0) and end[1] == pytest.approx(start[1])  # its own lane's end


def test_a_seed_plans_the_same_route_and_other_seeds_other_routes():
    def routes(seeds):
        env = grid_env()
        planned = []
        for seed in seeds:
            env.reset(seed=seed)
            planned.append(np.array([xy(w) for w in route_of(env)]))
        return planned

    first, again = routes([3, 4, 3]), routes([3])  # a fresh connection, too
    np.testing.assert_array_equal(first[0], first[2])
    np.testing.assert_array_equal(first[0], again[0])
    assert len({r.tobytes() for r in routes(range(6))}) > 3


def pure_pursuit(obs, config, speed_mps: float = 6.0) -> np.ndarray:
    """Steers at the route's first look-ahead point (what the policy sees, nothing more) and
    holds a speed: the double's car is a kinematic bicycle."""
    state, d = obs["state"], config.state.lookahead_m[0]
    y = state[5] * LANE_WIDTH  # route_lateral_at_<d>m, in lane widths
    steer = math.degrees(math.atan(WHEELBASE_M * 2.0 * y / d**2)) / MAX_STEER_DEG
    throttle = 0.5 * (speed_mps - state[0] * config.state.target_speed_mps)
    return np.clip(np.array([steer, throttle], np.float32), -1.0, 1.0)


def test_following_the_route_through_junctions_completes_it_with_a_full_driving_score():
    env = grid_env()
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        assert junction_turns(route_of(env))
        for _ in range(env.config.episode.max_steps):
            obs, _, terminated, truncated, info = env.step(pure_pursuit(obs, env.config))
            if terminated or truncated:
                break
        assert info["episode_end"] == "route_complete", (seed, info["episode_end"])
        assert info["route_completion"] == 1.0 and info["driving_score"] == 1.0
        assert sum(info["infractions"].values()) == 0


@pytest.mark.parametrize("blueprint, infraction", [
    ("vehicle.audi.a2", "collision_vehicle"),
    ("static.prop.streetbarrier", "collision_static"),
    ("walker.pedestrian.0001", "collision_pedestrian"),
])
def test_what_the_car_hits_is_the_collisions_kind(blueprint, infraction):
    fake = FakeCarla()
    env = carla_env(fake, **TOWN)
    env.reset(seed=0)
    world, ego = fake.world, fake.world.ego()._transform
    ahead = Location(ego.location.x + 15.0, ego.location.y, 0.0)  # in the ego's lane (the road is straight)
    world.spawn_actor(world.get_blueprint_library().find(blueprint), Transform(ahead, Rotation()))
    for _ in range(60):
        _, _, terminated, _, info = env.step(np.array([0.0, 1.0], np.float32))
        if terminated:
            break
    assert info["episode_end"] == "collision"
    assert {kind: n for kind, n in info["infractions"].items() if n} == {infraction: 1}
    assert info["driving_score"] < info["route_completion"]


@pytest.mark.parametrize("steer, end, infractions", [
    (0.4, "collision", {"off_road": 1, "collision_static": 1}),
    (-0.4, "off_route", {"wrong_lane": 1, "route_deviation": 1}),
])
def test_leaving_the_road_is_off_road_and_drifting_into_the_oncoming_lane_is_wrong_lane(steer, end, infractions):
    """A two-way street of the grid town: right of the car's lane is the kerb, which the car hits
    (a static collision, as on a real server) once it is off the road; left of it the oncoming
    lane, until the car is off its route (max_route_deviation_m)."""
    env = grid_env()
    env.reset(seed=1)
    for _ in range(60):
        _, _, terminated, _, info = env.step(np.array([steer, 0.3], np.float32))
        if terminated:
            break
    assert info["episode_end"] == end
    assert {kind: n for kind, n in info["infractions"].items() if n} == infractions
    assert info["outside_lanes_fraction"] > 0.0


# --- The planner on the real client's map -------------------------------------------------------


def opendrive_t_junction() -> str:
    """Three two-way roads of 40 m (lanes 3.5 m wide) into a T junction at the origin, west, east
    and south of it (OpenDRIVE's y points north; CARLA's is its mirror), with a road of its own
    for each of the six ways through; and a 100 m road alone, 100 m north."""

    def road(rid, x, y, hdg, length, curvature=0.0, junction=-1, links="", lanes=""):
        geometry = f'<arc curvature="{curvature}"/>' if curvature else "<line/>"
        return (f'<road id="{rid}" length="{length}" junction="{junction}"><link>{links}</link>'
                f'<planView><geometry s="0" x="{x}" y="{y}" hdg="{hdg}" length="{length}">{geometry}</geometry>'
                f'</planView><lanes><laneSection s="0">{lanes}</laneSection></lanes></road>')

    def lane(i, link=""):
        return (f'<lane id="{i}" type="driving" level="false"><link>{link}</link>'
                f'<width sOffset="0" a="{LANE_WIDTH}" b="0" c="0" d="0"/></lane>')

    center = '<center><lane id="0" type="none" level="false"/></center>'
    two_way = f"<left>{lane(1)}</left>{center}<right>{lane(-1)}</right>"
    into = '<successor elementType="junction" elementId="100"/>'
    out_of = '<predecessor elementType="junction" elementId="100"/>'
    roads = [road(1, -50, 0, 0, 40, links=into, lanes=two_way), road(2, 10, 0, 0, 40, links=out_of, lanes=two_way),
             road(3, 0, -10, -math.pi / 2, 40, links=out_of, lanes=two_way),
             road(4, -50, 100, 0, 100, lanes=two_way)]
    quarter = 10 * math.pi / 2  # the turns follow the roads' centre lines, radius 10 m
    ways = [  # id, start, heading, length, curvature (> 0 turns left), from (road, end, lane), to
        (10, (-10, 0), 0, 20, 0, (1, "end", -1), (2, "start", -1)),
        (11, (10, 0), math.pi, 20, 0, (2, "start", 1), (1, "end", 1)),
        (12, (-10, 0), 0, quarter, -0.1, (1, "end", -1), (3, "start", -1)),
        (13, (10, 0), math.pi, quarter, 0.1, (2, "start", 1), (3, "start", -1)),
        (14, (0, -10), math.pi / 2, quarter, 0.1, (3, "start", 1), (1, "end", 1)),
        (15, (0, -10), math.pi / 2, quarter, -0.1, (3, "start", 1), (2, "start", -1)),
    ]
    connections = []
    for rid, (x, y), hdg, length, k, (a, a_end, a_lane), (b, b_end, b_lane) in ways:
        links = (f'<predecessor elementType="road" elementId="{a}" contactPoint="{a_end}"/>'
                 f'<successor elementType="road" elementId="{b}" contactPoint="{b_end}"/>')
        lane_link = f'<predecessor id="{a_lane}"/><successor id="{b_lane}"/>'
        lanes = f"{center}<right>{lane(-1, lane_link)}</right>"
        roads.append(road(rid, x, y, hdg, length, k, 100, links, lanes))
        connections.append(f'<connection id="{rid}" incomingRoad="{a}" connectingRoad="{rid}" contactPoint="start">'
                           f'<laneLink from="{a_lane}" to="-1"/></connection>')
    return ('<?xml version="1.0" standalone="yes"?><OpenDRIVE><header revMajor="1" revMinor="4" name="" version="1"/>'
            + "".join(roads) + f'<junction id="100" name="T">{"".join(connections)}</junction></OpenDRIVE>')


def test_the_planner_on_an_opendrive_t_junction_loaded_by_the_real_client():
    """The real client's topology, `next` at a junction and its dead ends, which the double
    imitates: routes from the west road go straight on to the east road or turn right into the
    south road, to the end of either (lanes the 0.9.16 client leaves out of its topology)."""
    carla = pytest.importorskip("carla")
    carla_map = carla.Map("T", opendrive_t_junction())
    planner = RoutePlanner(carla_map, ROUTE_SPACING_M)
    ends = set()
    for seed in range(8):
        start = carla_map.get_waypoint(carla.Location(x=-40.0, y=LANE_WIDTH / 2, z=0.0))
        route = planner.plan(start, 60.0, np.random.default_rng(seed))
        points = np.array([xy(w) for w in route])
        gaps = np.linalg.norm(np.diff(points, axis=0), axis=1)
        assert np.all((gaps > 0.5 * ROUTE_SPACING_M) & (gaps <= 1.5 * ROUTE_SPACING_M + 1e-6))
        assert gaps.sum() >= 60.0 and any(w.is_junction for w in route)
        ends.add(tuple(points[-1].round(1)))
        assert all(carla_map.get_waypoint(w.transform.location, project_to_road=False) is not None for w in route)
    assert ends == {(50.0, 1.8), (-1.8, 50.0)}  # the east road's end, the south road's end (CARLA's y)
    # A road leading nowhere and from nowhere, also left out: its route is the rest of its lane.
    alone = planner.plan(carla_map.get_waypoint(carla.Location(x=-20.0, y=-100.0 + LANE_WIDTH / 2, z=0.0)),
                         60.0, np.random.default_rng(0))
    assert xy(alone[0])[0] == pytest.approx(-20.0) and xy(alone[-1])[0] == pytest.approx(50.0, abs=ROUTE_SPACING_M)
