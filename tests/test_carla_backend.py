"""The CARLA backend (carla_env/carla_sim.py) against the test double of the carla client.

No CARLA server runs on CI machines: these tests check our use of the client API (synchronous
mode, Traffic Manager, spawning and cleanup, sensor frame matching) against tests/fake_carla.py,
which models the parts we use. They were not run against a real server.
"""

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from carla_env.carla_sim import CarlaSimulator
from carla_env.config import CarlaEnvConfig
from carla_env.driving_env import DrivingEnv
from carla_env.servers import ServerError
from tests.fake_carla import FakeCarla

TM_PORT = 8004
DRIVE = np.array([0.0, 1.0], np.float32)


class InProcessServer:
    """A server handle for the in-memory double: always up; counts recoveries."""

    host, rpc_port = "127.0.0.1", 2000

    def __init__(self):
        self.restarts, self.stopped = 0, False

    def recover(self):
        self.restarts += 1

    def stop(self):
        self.stopped = True


def carla_env(fake=None, **config) -> DrivingEnv:
    config = CarlaEnvConfig.model_validate({"npc_vehicles": 5, **config})
    simulator = CarlaSimulator(config, InProcessServer(), TM_PORT, fake or FakeCarla())
    return DrivingEnv(simulator, config)


def test_passes_gymnasiums_env_checker_against_the_double():
    check_env(carla_env(), skip_render_check=True)


def test_world_runs_synchronously_at_the_configured_rate_with_its_own_traffic_manager():
    fake = FakeCarla()
    env = carla_env(fake, town="Town03", weather="WetNoon", simulation_hz=20.0)
    env.reset(seed=0)
    world, client = fake.world, fake.clients[-1]
    assert world.map.name.endswith("Town03")  # loaded: the server started on Town01
    assert world.settings.synchronous_mode and world.settings.fixed_delta_seconds == pytest.approx(0.05)
    assert world.weather == "WetNoon"
    assert client.traffic_manager.port == TM_PORT and client.traffic_manager.synchronous
    assert client.traffic_manager.seed == 0
    npcs = [a for a in world.actors.values() if a.type_id.startswith("vehicle.") and a.autopilot]
    assert len(npcs) == 5
    # 5 Hz control over 20 Hz physics: 4 ticks per step.
    frame = world.frame
    env.step(DRIVE)
    assert world.frame == frame + 4


def test_a_town_the_server_does_not_have_is_a_clear_error():
    with pytest.raises(ServerError, match=r"town 'Town05' is not on the server 127.0.0.1:2000; it has: Town01, Town02"):
        carla_env(town="Town05")


def test_no_actor_outlives_its_episode_over_many_episodes_and_close_removes_all():
    fake = FakeCarla()
    env = carla_env(fake, walkers=3)
    for episode in range(60):
        env.reset(seed=episode)
        for _ in range(3):
            env.step(DRIVE)
        # ego + 5 NPCs + 3 walkers + 3 walker controllers + camera, collision, lane invasion
        assert len(fake.world.actors) == 1 + 5 + 3 + 3 + 3
    env.close()
    assert fake.world.actors == {}
    assert not fake.world.settings.synchronous_mode  # a shared server is left running freely
    assert env.simulator.server.stopped


def test_actors_are_destroyed_even_when_an_episode_fails_midway():
    fake = FakeCarla()
    env = carla_env(fake)
    env.reset(seed=0)

    def broken_control(control):
        raise RuntimeError("lost the ego car")

    env.simulator.ego.apply_control = broken_control
    with pytest.raises(RuntimeError, match="lost the ego car"):
        env.step(DRIVE)
    env.close()
    assert fake.world.actors == {}


def test_each_observation_is_the_camera_image_of_the_frame_just_ticked():
    fake = FakeCarla()
    env = carla_env(fake)
    env.reset(seed=0)
    world = fake.world
    # The images of two intermediate frames arrive late, after the newer ones.
    world.late_frames = {world.frame + 1, world.frame + 6}
    for _ in range(3):
        obs, *_ = env.step(DRIVE)
        ego_x = world.ego().get_transform().location.x
        shade = int(ego_x * 10) % 200  # the double paints the image from the car's position
        right_half = obs["image"][-1][:, -1]
        assert np.all(right_half == shade)


def test_a_camera_image_that_never_comes_is_an_error_not_a_stale_image():
    fake = FakeCarla()
    env = carla_env(fake, server={"tick_timeout_s": 0.2})
    env.reset(seed=0)
    fake.world.drop_camera_frames = {fake.world.frame + 4}  # the last tick of the next step
    obs, reward, terminated, truncated, info = env.step(DRIVE)
    assert (reward, terminated, truncated, info["episode_end"]) == (0.0, False, True, "backend_failure")
    assert "no camera image for frame" in info["backend_failure"]
    health = env.backend_health()
    assert health["sensor_timeouts"] == 1 and health["server_restarts"] == 1
    obs, _ = env.reset(seed=1)  # the recovered backend starts a fresh episode
    assert env.step(DRIVE)[4]["episode_end"] is None


def test_a_collision_reported_by_the_sensor_terminates_with_its_penalty():
    fake = FakeCarla()
    env = carla_env(fake)
    env.reset(seed=0)
    fake.world.collide_at_frame = fake.world.frame + 6  # during the second step
    assert env.step(DRIVE)[2] is False
    _, reward, terminated, truncated, info = env.step(DRIVE)
    assert (terminated, truncated, info["episode_end"]) == (True, False, "collision")
    assert info["reward_terms"]["collision"] == -10.0


def test_steering_right_moves_the_car_right_of_its_route():
    fake = FakeCarla()
    env = carla_env(fake)
    env.reset(seed=0)
    for _ in range(5):
        env.step(DRIVE)
    for _ in range(3):
        obs, *_, info = env.step(np.array([0.5, 0.5], np.float32))
    assert info["lateral_offset_m"] > 0.0  # +y is right in CARLA, and in our contract
