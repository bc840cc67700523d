"""The driving contract (carla_env/): observations, reward terms, and how episodes end.

`DrivingEnv` is tested on a scripted simulator (measurements chosen by the test), and the
embedded backend (highway-env) on its real simulation.
"""

from dataclasses import replace

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from carla_env.config import EmbeddedEnvConfig, load_env_config
from carla_env.contract import Measurements
from carla_env.driving_env import DrivingEnv
from rl.config import ConfigError, parse_config

CRUISING = Measurements(
    speed_mps=25.0,
    lateral_offset_m=0.0,
    heading_error_rad=0.0,
    lane_width_m=4.0,
    lookahead_lateral_m=(0.0, 0.0, 0.0),
    front_gap_m=float("inf"),
    front_closing_mps=0.0,
    collided=False,
    on_route=True,
)


class ScriptedSimulator:
    """Returns the given measurements one step after another (the last one repeats); frame i
    is filled with the value i, so stacking order is visible."""

    def __init__(self, steps: list[Measurements], height: int = 84, width: int = 84, start: Measurements = CRUISING):
        self.steps, self.shape, self.t, self.start = steps, (height, width), 0, start
        self.actions: list[np.ndarray] = []

    def reset(self, seed):
        self.t = 0
        return self._frame(), self.start

    def step(self, action):
        self.actions.append(action)
        self.t += 1
        return self._frame(), self.steps[min(self.t, len(self.steps)) - 1]

    def _frame(self):
        return np.full(self.shape, self.t, np.uint8)

    def health(self):
        return {}

    def close(self):
        pass


def scripted_env(steps, start: Measurements = CRUISING, **config) -> DrivingEnv:
    return DrivingEnv(ScriptedSimulator(steps, start=start), EmbeddedEnvConfig.model_validate(config))


def run(env: DrivingEnv, action=(0.0, 0.0), max_steps: int = 10_000):
    env.reset(seed=0)
    for t in range(1, max_steps + 1):
        obs, reward, terminated, truncated, info = env.step(np.array(action, np.float32))
        if terminated or truncated:
            return t, reward, terminated, truncated, info
    raise AssertionError("episode did not end")


# --- Reward terms --------------------------------------------------------------------------


def test_reward_terms_by_hand():
    # target 20 m/s; 15 m/s at 60 degrees off the lane -> 7.5 m/s along it: progress 0.375.
    # 1 m off centre in a 4 m lane = half of the half-width: centering -0.3 * 0.5.
    # steer 0 -> 0.5: comfort -0.1 * 0.25.
    m = replace(CRUISING, speed_mps=15.0, heading_error_rad=np.pi / 3, lateral_offset_m=-1.0)
    env = scripted_env([m], state={"target_speed_mps": 20.0})
    env.reset(seed=0)
    _, reward, terminated, truncated, info = env.step(np.array([0.5, 0.0], np.float32))
    terms = info["reward_terms"]
    assert terms == pytest.approx(
        {"progress": 0.375, "lane_centering": -0.15, "collision": 0.0, "off_route": 0.0, "comfort": -0.025}
    )
    assert reward == pytest.approx(sum(terms.values()))
    assert not terminated and not truncated


def test_each_term_saturates_at_its_magnitude():
    # 3x target speed earns 1x progress; 3 half-widths off centre costs 1x centering. Colliding
    # while leaving the road ends the episode as a collision: its penalty only, once.
    m = replace(CRUISING, speed_mps=75.0, lateral_offset_m=6.0, collided=True, on_route=False)
    env = scripted_env([m])
    env.reset(seed=0)
    env.step(np.array([-1.0, 0.0], np.float32))
    _, reward, *_, info = env.step(np.array([1.0, 0.0], np.float32))  # full swing: -1 to +1
    w = env.config.reward
    assert info["reward_terms"] == pytest.approx(
        {"progress": w.progress, "lane_centering": -w.lane_centering, "collision": -w.collision,
         "off_route": 0.0, "comfort": -w.comfort}
    )
    assert info["episode_end"] == "collision"
    # The documented per-step bounds: this step is the worst possible, but for progress.
    r_min, r_max = env.reward_bounds
    assert (r_min, r_max) == pytest.approx((-(0.3 + 10.0 + 0.1), 1.0))
    assert reward == pytest.approx(r_min + w.progress)


def test_driving_backwards_or_sideways_earns_no_progress():
    backwards = replace(CRUISING, heading_error_rad=np.pi)
    env = scripted_env([backwards])
    env.reset(seed=0)
    assert env.step(np.zeros(2, np.float32))[4]["reward_terms"]["progress"] == 0.0


# --- How episodes end ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "event, reason",
    [({"collided": True}, "collision"), ({"on_route": False}, "off_route")],
)
def test_collision_and_leaving_the_road_terminate(event, reason):
    steps = [CRUISING] * 3 + [replace(CRUISING, **event)]
    t, _, terminated, truncated, info = run(scripted_env(steps))
    assert (t, terminated, truncated, info["episode_end"]) == (4, True, False, reason)


def test_stuck_terminates_after_stuck_seconds_below_stuck_speed():
    # 5 Hz, stuck after 2 s = 10 steps below 0.5 m/s; a moving step in between restarts the count.
    slow, moving = replace(CRUISING, speed_mps=0.2), CRUISING
    steps = [slow] * 9 + [moving] + [slow] * 20
    t, _, terminated, truncated, info = run(
        scripted_env(steps, episode={"stuck_seconds": 2.0, "stuck_speed_mps": 0.5})
    )
    assert (t, terminated, truncated, info["episode_end"]) == (20, True, False, "stuck")


def test_time_limit_truncates_and_does_not_terminate():
    t, _, terminated, truncated, info = run(scripted_env([CRUISING], episode={"max_seconds": 3.0}))
    assert (t, terminated, truncated, info["episode_end"]) == (15, False, True, "time_limit")


def test_a_collision_on_the_last_step_is_a_termination_not_a_truncation():
    steps = [CRUISING] * 14 + [replace(CRUISING, collided=True)]
    t, _, terminated, truncated, info = run(scripted_env(steps, episode={"max_seconds": 3.0}))
    assert (t, terminated, truncated, info["episode_end"]) == (15, True, False, "collision")


# --- Observations and actions ---------------------------------------------------------------


def test_frames_are_stacked_oldest_first_and_the_first_frame_fills_the_stack():
    env = scripted_env([CRUISING], camera={"width": 32, "height": 24, "frame_stack": 3})
    env.simulator.shape = (24, 32)
    obs, _ = env.reset(seed=0)
    assert obs["image"].shape == (3, 24, 32) and obs["image"].dtype == np.uint8
    assert obs["image"][:, 0, 0].tolist() == [0, 0, 0]
    for _ in range(2):
        obs, *_ = env.step(np.zeros(2, np.float32))
    assert obs["image"][:, 0, 0].tolist() == [0, 1, 2]


def test_state_vector_carries_the_previous_action_and_scaled_measurements():
    m = replace(CRUISING, speed_mps=12.5, lateral_offset_m=1.0, front_gap_m=30.0, front_closing_mps=5.0,
                lookahead_lateral_m=(0.4, 0.8, 2.0))
    env = scripted_env([m])
    env.reset(seed=0)
    env.step(np.array([0.25, -0.5], np.float32))
    obs, *_ = env.step(np.array([0.5, 0.75], np.float32))
    # speed/25, the action just applied (the policy's previous one when it next acts),
    # lateral/2 m, heading/pi, lookahead/4 m, gap/60 m, closing speed/25
    assert obs["state"] == pytest.approx([0.5, 0.5, 0.75, 0.5, 0.0, 0.1, 0.2, 0.5, 0.5, 0.2])
    assert obs["state"].dtype == np.float32


def test_actions_are_clipped_and_malformed_actions_are_refused():
    env = scripted_env([CRUISING])
    env.reset(seed=0)
    env.step(np.array([3.0, -2.0]))
    assert env.simulator.actions[-1].tolist() == [1.0, -1.0]
    with pytest.raises(ValueError, match="action must be 2 finite floats"):
        env.step(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="action must be 2 finite floats"):
        env.step(np.zeros(3))


def test_a_backend_frame_of_the_wrong_shape_is_an_error_not_a_silent_resize():
    env = scripted_env([CRUISING])
    env.simulator.shape = (84, 83)
    with pytest.raises(RuntimeError, match=r"ScriptedSimulator returned a uint8 frame of shape \(84, 83\)"):
        env.reset(seed=0)


# --- Configuration --------------------------------------------------------------------------


def _experiment(kwargs: dict) -> dict:
    return {
        "experiment": {"name": "x", "stop_env_steps": 10},
        "env": {"id": "carla_env:EmbeddedDriving-v0", "kwargs": kwargs},
    }


def test_a_misspelled_or_out_of_range_env_key_fails_at_config_load_naming_the_key():
    with pytest.raises(ConfigError) as err:
        parse_config(_experiment({"reward": {"colision": 5.0}, "camera": {"frame_stack": 0}}), "drive.yaml")
    message = str(err.value)
    assert "drive.yaml" in message
    assert "env.kwargs.reward.colision: unknown key" in message
    assert "env.kwargs.camera.frame_stack: Input should be greater than or equal to 1" in message


def test_physics_steps_must_divide_into_control_steps():
    with pytest.raises(ConfigError, match=r"simulation_hz \(7.0\) must be a whole multiple of episode.control_hz \(5.0\)"):
        load_env_config(EmbeddedEnvConfig, {"simulation_hz": 7.0})


# --- The embedded backend (highway-env) ----------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
    env = gym.make("carla_env:EmbeddedDriving-v0")
    yield env
    env.close()


def test_embedded_env_passes_gymnasiums_env_checker(embedded):
    check_env(embedded.unwrapped, skip_render_check=True)


def test_embedded_env_has_traffic_and_renders_the_road(embedded):
    obs, _ = embedded.reset(seed=0)
    highway = embedded.unwrapped.simulator._env
    assert len(highway.road.vehicles) == 1 + 20  # ego + the default 20 NPCs
    frame = obs["image"][-1]
    assert frame.std() > 10  # lanes and cars drawn, not a blank frame


def test_embedded_actions_mean_what_the_contract_says(embedded):
    def lateral_and_speed_after(action, steps=5):
        embedded.reset(seed=3)
        for _ in range(steps):
            _, _, terminated, truncated, info = embedded.step(np.array(action, np.float32))
            assert not (terminated or truncated)
        return info["lateral_offset_m"], info["speed_mps"]

    straight_lat, straight_speed = lateral_and_speed_after([0.0, 0.0])
    right_lat, _ = lateral_and_speed_after([0.3, 0.0], steps=2)
    left_lat, _ = lateral_and_speed_after([-0.3, 0.0], steps=2)
    _, faster = lateral_and_speed_after([0.0, 1.0])
    _, slower = lateral_and_speed_after([0.0, -1.0])
    assert left_lat < straight_lat < right_lat  # steer > 0 turns right (+y), as in CARLA
    assert slower < straight_speed < faster


def test_embedded_rewards_stay_within_the_documented_bounds_and_sum_their_terms(embedded):
    r_min, r_max = embedded.unwrapped.reward_bounds
    embedded.action_space.seed(0)
    ends = set()
    for episode in range(5):
        embedded.reset(seed=episode)
        done = False
        while not done:
            _, reward, terminated, truncated, info = embedded.step(embedded.action_space.sample())
            assert r_min <= reward <= r_max
            assert reward == pytest.approx(sum(info["reward_terms"].values()))
            done = terminated or truncated
        ends.add(info["episode_end"])
    assert ends <= {"collision", "off_route", "stuck", "time_limit"}


def test_embedded_env_refuses_the_dummy_video_driver_that_would_blank_its_frames(monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    with pytest.raises(RuntimeError, match="SDL_VIDEODRIVER=dummy makes highway-env render black frames"):
        gym.make("carla_env:EmbeddedDriving-v0")


def test_the_highways_route_is_the_road_a_car_at_the_target_speed_covers_in_the_time_limit(embedded):
    from carla_env.controllers import LaneKeepingController

    config = embedded.unwrapped.config
    controller = LaneKeepingController(config)
    obs, _ = embedded.reset(seed=1)
    start = embedded.unwrapped.simulator._env.vehicle.position[0]
    done = False
    while not done:
        obs, _, terminated, truncated, info = embedded.step(controller(obs))
        done = terminated or truncated
    driven = embedded.unwrapped.simulator._env.vehicle.position[0] - start
    nominal = config.state.target_speed_mps * config.episode.max_seconds
    assert info["route_completion"] == pytest.approx(min(driven / nominal, 1.0))
    assert info["driving_score"] <= info["route_completion"]
    # Its nominal end is no destination: a car faster than the target speed drives on.
    assert info["episode_end"] in ("time_limit", "collision")
