"""The embedded town (carla_env/town.py): its road network, route planning, right of way, and the
route-following baseline driving it; plus the route geometry both backends measure with
(carla_env/route.py). Real highway-env simulation throughout."""

import math
from collections import Counter

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from carla_env.config import EmbeddedTownConfig, load_env_config
from carla_env.controllers import RouteFollowingController, constant_policy
from carla_env.route import Route
from carla_env.town import build_town, junction_turns, plan_route, route_centre_line
from common.config import ConfigError
from rl.evaluation import evaluate

TOWN = "carla_env:EmbeddedTown-v0"
SMALL = {"camera": {"width": 48, "height": 48, "frame_stack": 2}}


@pytest.fixture(scope="module")
def town():
    return build_town(EmbeddedTownConfig())


def test_the_town_has_a_four_way_junction_t_junctions_and_right_angle_bends(town):
    assert Counter(town.junctions.values()) == {"4-way": 1, "T": 4, "bend": 4}
    # Every street is two-way: each lane between two junctions has one back.
    ends = {(a.split(":")[0], b.split(":")[0]) for a, b in town.streets}
    assert all((b, a) in ends for a, b in ends) and len(ends) == 24
    # A bend turns its cars through 90 degrees.
    for (start, end), (junction, maneuver) in town.movements.items():
        lane = town.network.get_lane((start, end, 0))
        turned = math.degrees(abs((lane.heading_at(lane.length) - lane.heading_at(0) + math.pi) % (2 * math.pi) - math.pi))
        assert turned == pytest.approx({"straight": 0.0, "left": 90.0, "right": 90.0}[maneuver], abs=1e-6)
        # ... along a quarter circle from the stop line it starts at to the exit it ends at.
        if maneuver != "straight":
            assert lane.length == pytest.approx(lane.radius * math.pi / 2)
        assert np.linalg.norm(lane.position(lane.length, 0) - lane.position(0, 0)) < lane.length + 1e-9
        if town.junctions[junction] == "bend":
            assert maneuver != "straight"


def test_routes_are_connected_turn_at_junctions_and_have_the_configured_length(town):
    config = EmbeddedTownConfig()
    rng = np.random.default_rng(0)
    for _ in range(30):
        lanes = plan_route(town, config, rng)
        assert all(a[1] == b[0] for a, b in zip(lanes, lanes[1:]))
        assert junction_turns(town, lanes) >= config.route_min_turns
        line = Route(route_centre_line(town, lanes))
        assert config.route_min_m - 1 <= line.length_m <= config.route_max_m + 1
        # The centre line is continuous: no gap between one lane and the next.
        assert np.linalg.norm(np.diff(line.points, axis=0), axis=1).max() < 1.0


def test_an_impossible_route_request_is_a_clear_error(town):
    config = EmbeddedTownConfig(route_min_m=2000.0, route_max_m=3000.0)
    with pytest.raises(RuntimeError, match="route_min_m"):
        plan_route(build_town(config), config, np.random.default_rng(0), tries=20)


def test_route_geometry_by_hand():
    # East 20 m, then south 20 m (y points down: south is to the right of east).
    route = Route([(0.0, 0.0), (20.0, 0.0), (20.0, 20.0)])
    assert route.length_m == 40.0
    s, lateral = route.locate(np.array([5.0, 1.0]))  # 1 m right of the route
    assert (s, lateral) == (5.0, 1.0)
    assert route.heading_error(math.radians(10), s) == pytest.approx(math.radians(10))
    # Ahead across the corner: 15 m on reaches the corner (20, 0); 25 m on is (20, 10), 10 m right.
    ahead = route.lateral_ahead(np.array([5.0, 0.0]), 0.0, 5.0, [15.0, 25.0])
    assert ahead == pytest.approx((0.0, 10.0))
    # Progress only grows, and the search stays near the car's last place.
    route.locate(np.array([20.5, 10.0]))
    assert route.progress_m == pytest.approx(30.0)
    # A point near the route's start is not found: only the segments from 5 m behind the car's
    # last place on are searched (here the second leg, which starts at s = 20).
    assert route.locate(np.array([3.0, 0.0]))[0] == 20.0 and route.progress_m == pytest.approx(30.0)


def test_town_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="block_m"):
        load_env_config(EmbeddedTownConfig, {"block_m": 40.0})
    with pytest.raises(ConfigError, match="route_min_m"):
        load_env_config(EmbeddedTownConfig, {"route_min_m": 500.0, "route_max_m": 300.0})


def test_town_env_passes_gymnasiums_env_checker():
    env = gym.make(TOWN, **SMALL)
    try:
        check_env(env.unwrapped, skip_render_check=True)
    finally:
        env.close()


def test_brakes_stop_the_car_and_never_reverse_it():
    for env_id in (TOWN, "carla_env:EmbeddedDriving-v0"):
        env = gym.make(env_id, **SMALL)
        env.reset(seed=3)
        speeds = [env.step(np.array([0.0, -1.0], np.float32))[4]["speed_mps"] for _ in range(40)]
        env.close()
        assert min(speeds) >= 0.0 and speeds[-1] == 0.0, (env_id, speeds)


def test_the_route_following_controller_earns_the_driving_score_the_constant_action_does_not():
    seeds = range(1000, 1008)
    config = EmbeddedTownConfig.model_validate(SMALL)
    controller = evaluate(TOWN, SMALL, RouteFollowingController(config), seeds)
    constant = evaluate(TOWN, SMALL, constant_policy(), seeds)
    assert len(controller.driving_scores) == len(seeds)
    assert all(0.0 <= x <= 1.0 for x in controller.driving_scores + controller.route_completions)
    assert controller.ends.get("route_complete", 0.0) >= 0.5, controller.row()
    assert controller.driving_score_mean > constant.driving_score_mean + 0.3, (controller.row(), constant.row())
    # The constant action cannot take the route's first bend or turn.
    assert constant.route_completion_mean < 0.5, constant.row()


def test_the_view_draws_the_route_ahead():
    env = gym.make(TOWN, render_mode="rgb_array", **SMALL)
    env.reset(seed=0)
    image = env.render()
    env.close()
    route_pixels = np.all(image == (40, 200, 255), axis=-1).sum()
    assert route_pixels > 50, route_pixels


def test_a_car_too_fast_for_a_turn_runs_wide():
    """Full steering at 7 m/s turns the car through a right angle within ~12 m; at 25 m/s the
    tyres' grip (max_lateral_accel_mps2) allows only a wide arc."""
    def turned_after(speed: float, metres: float) -> float:
        env = gym.make(TOWN, **SMALL, start_speed_mps=speed)
        env.reset(seed=0)
        car = env.unwrapped.simulator._env.unwrapped.vehicle
        heading, travelled = car.heading, 0.0
        while travelled < metres:
            position = car.position.copy()
            env.unwrapped.simulator._env.step(np.array([0.0, 1.0], np.float32))  # [accel 0, steer right]
            travelled += float(np.linalg.norm(car.position - position))
        env.close()
        return math.degrees(abs((car.heading - heading + math.pi) % (2 * math.pi) - math.pi))

    assert turned_after(7.0, 12.0) > 60.0
    assert turned_after(25.0, 12.0) < 15.0


def test_a_projection_at_the_routes_very_end_finds_its_end():
    route = Route([(0.0, 0.0), (10.0, 0.0), (10.0, 10.0)])
    assert route.project(np.array([10.0, 25.0]), route.length_m, 0.0, 30.0) == pytest.approx((20.0, 0.0))
    # Points that creep forward by less than 1e-6 each are one point, not a zero-length segment.
    creeping = Route([(0.0, 0.0), (5.0, 0.0), (5.0 + 6e-7, 0.0), (5.0 + 1.2e-6, 0.0), (9.0, 0.0)])
    assert np.all(np.diff(creeping.s) > 0) and creeping.locate(np.array([5.0, 1.0])) == pytest.approx((5.0, 1.0))


def test_swerving_into_the_oncoming_lane_is_a_wrong_lane_and_over_the_kerb_is_off_road():
    env = gym.make(TOWN, **SMALL, npc_vehicles=0)
    env.reset(seed=0)
    sim = env.unwrapped.simulator
    car, lane = sim._env.unwrapped.vehicle, sim.town.network.get_lane((*sim.route_lanes[0], 0))
    measured = {}
    for name, lateral in (("own lane", 0.0), ("oncoming lane", -4.0), ("over the kerb", 4.5)):
        car.position = lane.position(20.0, lateral)  # lateral > 0: right of the route
        m = sim._measure()
        measured[name] = (m.off_road, m.wrong_lane)
    env.close()
    assert measured == {"own lane": (False, False), "oncoming lane": (False, True), "over the kerb": (True, False)}


def test_npcs_keep_finding_destinations_in_a_larger_town():
    """A 4x4 town has 48 streets; an NPC must never be sent to the street it is on (highway-env's
    path search from a node to itself walks every path in the graph: a hang)."""
    import signal

    def hung(*_):
        raise TimeoutError("the town hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        env = gym.make(TOWN, **SMALL, grid=4, npc_vehicles=20, route_max_m=700.0)
        for seed in range(3):
            env.reset(seed=seed)
            for _ in range(40):
                if any(env.step(np.array([0.0, 0.0], np.float32))[2:4]):
                    break
        env.close()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
