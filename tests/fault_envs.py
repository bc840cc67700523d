"""Envs with one thing broken, for the fault-injection tests (tests/test_health_faults.py,
test_env_runner_faults.py, test_async_sampling.py)."""

import os
import time
from pathlib import Path

import gymnasium as gym

SCALED_PENDULUM = "ScaledRewardPendulum-v0"


def _scaled_pendulum(scale: float = 1000.0, **kwargs):
    return gym.wrappers.TransformReward(gym.make("Pendulum-v1", **kwargs), lambda r: scale * r)


def register() -> str:
    """Pendulum whose rewards are `scale` times what its documented bounds say."""
    if SCALED_PENDULUM not in gym.registry:
        gym.register(SCALED_PENDULUM, entry_point=_scaled_pendulum, max_episode_steps=200)
    return SCALED_PENDULUM


def _first_to_claim(marker: Path, text: str) -> bool:
    """Creates `marker` holding `text` unless it exists: True for exactly one env of all the
    runners, however close together they get there (runners sampling in step reach the same
    step at the same moment)."""
    try:
        with open(marker, "x") as file:
            file.write(text)
    except FileExistsError:
        return False
    return True


CRASHING_PENDULUM = "tests.fault_envs:CrashingPendulum-v0"


class CrashingPendulum(gym.Wrapper):
    """Pendulum that fails in the middle of an episode, once: the first env to reach
    `crash_at_step` steps writes "<pid> <time>" to `marker` and either raises (`how="raise"`) or
    takes its whole env runner process down (`how="exit"`, like a segfaulting simulator client).
    Every env appends "<pid> <time>" to `<marker>.created` when it is made, so a test can tell
    an env re-created inside its process from a process replaced."""

    def __init__(self, marker: str, crash_at_step: int = 300, how: str = "raise"):
        super().__init__(gym.make("Pendulum-v1"))
        self.marker, self.crash_at_step, self.how, self.steps = Path(marker), crash_at_step, how, 0
        with open(f"{marker}.created", "a") as log:
            log.write(f"{os.getpid()} {time.time()}\n")

    def step(self, action):
        self.steps += 1
        if self.steps == self.crash_at_step and _first_to_claim(self.marker, f"{os.getpid()} {time.time()}"):
            if self.how == "exit":
                os._exit(1)
            raise RuntimeError("simulated env failure mid-episode")
        return self.env.step(action)


def _crashing_pendulum(marker: str, crash_at_step: int = 300, how: str = "raise") -> CrashingPendulum:
    return CrashingPendulum(marker, crash_at_step, how)


# Registered on import: a remote env runner imports this module through the id's prefix.
if CRASHING_PENDULUM.split(":")[1] not in gym.registry:
    gym.register(CRASHING_PENDULUM.split(":")[1], entry_point=_crashing_pendulum, max_episode_steps=200)


HANGING_PENDULUM = "tests.fault_envs:HangingPendulum-v0"


class HangingPendulum(gym.Wrapper):
    """Pendulum that freezes in the middle of an episode, once, like a simulator that stops
    answering: the first env to reach `hang_at_step` steps writes its pid to `marker` and blocks
    for `hang_s` seconds (its env runner answers nothing meanwhile). Bounded, so that a test that
    goes wrong does not leave the process behind for long. With `every_env`, every env blocks
    there (and the first writes the marker): all runners slow at once, as on a saturated node."""

    def __init__(self, marker: str, hang_at_step: int = 150, hang_s: float = 300.0, every_env: bool = False):
        super().__init__(gym.make("Pendulum-v1"))
        self.marker, self.hang_at_step, self.hang_s, self.steps = Path(marker), hang_at_step, hang_s, 0
        self.every_env = every_env

    def step(self, action):
        self.steps += 1
        if self.steps == self.hang_at_step and (_first_to_claim(self.marker, str(os.getpid())) or self.every_env):
            time.sleep(self.hang_s)
        return self.env.step(action)


def _hanging_pendulum(marker: str, hang_at_step: int = 150, hang_s: float = 300.0,
                      every_env: bool = False) -> HangingPendulum:
    return HangingPendulum(marker, hang_at_step, hang_s, every_env)


if HANGING_PENDULUM.split(":")[1] not in gym.registry:
    gym.register(HANGING_PENDULUM.split(":")[1], entry_point=_hanging_pendulum, max_episode_steps=200)


BROKEN_SENSOR_PENDULUM = "tests.fault_envs:BrokenSensorPendulum-v0"


class BrokenSensorPendulum(gym.Wrapper):
    """Pendulum whose sensor breaks at env step `at_step` (0: at the first reset): from then on
    every observation value is `value` (NaN: a sensor sending garbage; 0: a dead sensor sending
    the same reading, across resets too)."""

    def __init__(self, at_step: int = 900, value: float = float("nan")):
        super().__init__(gym.make("Pendulum-v1"))
        self.at_step, self.value, self.steps = at_step, value, 0

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return self._broken(obs), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        return self._broken(obs), reward, terminated, truncated, info

    def _broken(self, obs):
        return obs if self.steps < self.at_step else obs * 0 + self.value


def _broken_sensor_pendulum(at_step: int = 900, value: float = float("nan")) -> BrokenSensorPendulum:
    return BrokenSensorPendulum(at_step, value)


if BROKEN_SENSOR_PENDULUM.split(":")[1] not in gym.registry:
    gym.register(BROKEN_SENSOR_PENDULUM.split(":")[1], entry_point=_broken_sensor_pendulum, max_episode_steps=200)
