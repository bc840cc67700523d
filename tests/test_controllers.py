"""The driving baselines (carla_env/controllers.py) and the evaluation harness (rl/evaluation.py),
by hand-built observations and a short real env run."""

import numpy as np
import pytest

from carla_env.config import EmbeddedEnvConfig
from carla_env.contract import Measurements, state_vector
from carla_env.controllers import LaneKeepingController, constant_policy, random_policy
from rl.evaluation import evaluate

CONFIG = EmbeddedEnvConfig()  # target 25 m/s, lane 3.5 m, gaps read up to 60 m


def observation(speed=25.0, lateral=0.0, heading=0.0, ahead=(0.0, 0.0, 0.0), gap=np.inf, closing=0.0) -> dict:
    m = Measurements(speed_mps=speed, lateral_offset_m=lateral, heading_error_rad=heading, lane_width_m=3.5,
                     lookahead_lateral_m=ahead, front_gap_m=gap, front_closing_mps=closing, collided=False,
                     on_route=True)
    return {"state": state_vector(m, np.zeros(2, np.float32), CONFIG)}


def test_the_simple_policies_are_what_they_say():
    assert np.array_equal(constant_policy()(None), [0.0, 0.0])
    policy = random_policy(3)
    actions = np.stack([policy(None) for _ in range(500)])
    assert actions.min() >= -1 and actions.max() <= 1 and abs(actions.mean()) < 0.1 and actions.std() > 0.5
    assert np.array_equal(random_policy(3)(None), random_policy(3)(None))  # seeded


def test_the_controller_steers_back_to_the_lane_centre():
    control = LaneKeepingController(CONFIG)
    steer_right_of_centre = control(observation(lateral=1.0))[0]  # right of the centre: steer left
    assert steer_right_of_centre == pytest.approx(-0.4 * 1.0 / 1.75, abs=1e-6)
    assert control(observation(heading=0.1))[0] == pytest.approx(-3.0 * 0.1 / np.pi, abs=1e-6)
    assert control(observation(ahead=(1.75, 0.0, 0.0)))[0] == pytest.approx(0.3 * 0.5, abs=1e-6)  # road bends right


def test_the_controller_keeps_the_target_speed_and_a_time_gap_like_idm():
    control = LaneKeepingController(CONFIG)
    # Free road: a = 3 (1 - (v/25)^4); throttle = a / 5.
    assert control(observation(speed=12.5))[1] == pytest.approx(3.0 * (1 - 0.5**4) / 5.0, abs=1e-6)
    assert control(observation(speed=25.0))[1] == pytest.approx(0.0, abs=1e-6)
    # 20 m behind a car at 20 m/s: wanted gap 10 + 1.5 * 20 = 40 m, so brake hard.
    assert control(observation(speed=20.0, gap=20.0))[1] == -1.0
    # Far behind (60 m or more reads as free road).
    assert control(observation(speed=20.0, gap=80.0))[1] > 0.0
    # 50 m behind at the same speed: gap wanted 40 m, a = 3 (1 - 0.8^4 - 0.8^2) > 0 ...
    assert control(observation(speed=20.0, gap=50.0))[1] == pytest.approx(3 * (1 - 0.8**4 - 0.8**2) / 5, abs=1e-5)
    # ... but closing in at 10 m/s: gap wanted 40 + 20 * 10 / (2 sqrt(3 * 5)) = 65.8 m: brake.
    assert control(observation(speed=20.0, gap=50.0, closing=10.0))[1] < 0.0


def test_evaluate_reports_returns_lengths_and_how_episodes_ended():
    result = evaluate("Pendulum-v1", {}, constant_policy((0.0,)), seeds=[0, 1])
    assert result.lengths == [200, 200] and result.ends == {"truncated": 1.0} and result.speed_mean is None
    again = evaluate("Pendulum-v1", {}, constant_policy((0.0,)), seeds=[0, 1])
    assert again.returns == result.returns  # the seeds fix the episodes
    row = result.row()
    assert row["return"] == pytest.approx(np.mean(result.returns)) and row["length"] == 200
