"""The CARLA leaderboard's route metrics (carla_env/driving_score.py), by hand, and as DrivingEnv
reports them at an episode's end (on a scripted simulator: measurements chosen by the test)."""

from dataclasses import replace

import pytest

from carla_env.driving_score import INFRACTIONS, RouteScore, driving_score
from tests.test_driving_env import CRUISING, scripted_env

ON_ROUTE = replace(CRUISING, route_length_m=100.0)


def test_driving_score_is_completion_times_the_leaderboards_penalties():
    # 80% of the route, one vehicle collision (0.60) and one static collision (0.65):
    assert driving_score(0.8, {"collision_vehicle": 1, "collision_static": 1}, 0.0) == pytest.approx(0.8 * 0.60 * 0.65)
    # Penalties compound per infraction; a pedestrian costs 0.50.
    assert driving_score(1.0, {"collision_vehicle": 2, "collision_pedestrian": 1}, 0.0) == pytest.approx(0.36 * 0.5)
    # 10% of the driven route outside the route's lanes: x 0.9 (OutsideRouteLanesTest).
    assert driving_score(1.0, {}, 0.1) == pytest.approx(0.9)
    # Infractions that end the route cost only the route left undone.
    assert driving_score(0.5, {"blocked": 1, "timeout": 1, "route_deviation": 1, "off_road": 3}, 0.0) == 0.5


def test_route_score_counts_entries_into_off_road_and_wrong_lane_and_the_distance_driven_there():
    score = RouteScore(route_length_m=100.0)
    path = [(10, False, False), (20, True, False), (30, True, False), (40, False, False),  # 20 m off road
            (50, False, True), (60, False, False), (70, True, True)]                       # 10 m wrong lane, 10 m off
    for progress, off_road, wrong_lane in path:
        score.update(replace(ON_ROUTE, route_progress_m=progress, off_road=off_road, wrong_lane=wrong_lane))
    info = score.end("stuck")
    assert info["infractions"]["off_road"] == 2 and info["infractions"]["wrong_lane"] == 1
    assert info["infractions"]["blocked"] == 1
    assert info["route_completion"] == pytest.approx(0.7)
    assert info["outside_lanes_fraction"] == pytest.approx(40 / 70)
    assert info["driving_score"] == pytest.approx(0.7 * (1 - 40 / 70))
    assert set(info["infractions"]) == set(INFRACTIONS)


def test_progress_never_goes_back_or_past_the_route_end():
    score = RouteScore(route_length_m=50.0)
    for progress in (20, 10, 30, 80):
        score.update(replace(ON_ROUTE, route_progress_m=progress))
    assert score.end(None)["route_completion"] == 1.0


def test_the_env_ends_a_completed_route_and_reports_its_metrics_in_the_last_info():
    steps = [replace(ON_ROUTE, route_progress_m=40.0 * (t + 1)) for t in range(3)]
    env = scripted_env(steps, start=ON_ROUTE)
    _, info = env.reset(seed=0)
    assert "driving_score" not in info
    _, _, terminated, truncated, info = env.step([0.0, 0.0])
    assert not (terminated or truncated) and "driving_score" not in info
    env.step([0.0, 0.0])
    _, _, terminated, truncated, info = env.step([0.0, 0.0])
    assert (terminated, truncated, info["episode_end"]) == (True, False, "route_complete")
    assert info["route_completion"] == 1.0 and info["driving_score"] == 1.0
    assert not any(info["infractions"].values())


@pytest.mark.parametrize("event, reason, infraction, factor", [
    ({"collided": True}, "collision", "collision_vehicle", 0.60),
    ({"collided": True, "collided_with": "static"}, "collision", "collision_static", 0.65),
    ({"on_route": False}, "off_route", "route_deviation", 1.0),
])
def test_an_episode_ended_by_an_infraction_reports_it(event, reason, infraction, factor):
    steps = [replace(ON_ROUTE, route_progress_m=10.0), replace(ON_ROUTE, route_progress_m=25.0, **event)]
    env = scripted_env(steps, start=ON_ROUTE)
    env.reset(seed=0)
    env.step([0.0, 0.0])
    _, _, terminated, _, info = env.step([0.0, 0.0])
    assert terminated and info["episode_end"] == reason
    assert info["infractions"][infraction] == 1
    assert info["driving_score"] == pytest.approx(0.25 * factor)


def test_the_time_limit_is_a_route_timeout():
    env = scripted_env([replace(ON_ROUTE, route_progress_m=5.0)], start=ON_ROUTE, episode={"max_seconds": 1.0, "control_hz": 5.0})
    env.reset(seed=0)
    for _ in range(5):
        _, _, terminated, truncated, info = env.step([0.0, 0.0])
    assert (terminated, truncated, info["episode_end"]) == (False, True, "time_limit")
    assert info["infractions"]["timeout"] == 1 and info["route_completion"] == pytest.approx(0.05)


def test_backends_without_a_route_report_no_route_metrics():
    env = scripted_env([replace(CRUISING, collided=True)])
    env.reset(seed=0)
    _, _, terminated, _, info = env.step([0.0, 0.0])
    assert terminated and "driving_score" not in info and "infractions" not in info
