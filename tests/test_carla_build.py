"""N2 (second review): the algorithm builds while the CARLA servers are still starting.

RLlib 2.60 makes every remote env runner's env while it builds the algorithm, and asks runner 1
for the spaces (`Algorithm.setup` -> `EnvRunnerGroup.get_spaces`) even when the config gives
them. A CARLA env that waited for its server there failed the build when a server was slow to
come up (an image pulled on a cold node): its runner was out of service and `get_spaces` raised
IndexError. The env connects at its first reset now, and the config gives RLlib the spaces.
"""

import json
import socket
from pathlib import Path

import gymnasium as gym

from carla_env.carla_driving import CarlaDrivingEnv
from rl.config import load_config
from rl.experiment import build_td3_config
from tests.fake_carla import FakeCarla

ROOT = Path(__file__).resolve().parents[1]
NO_SERVER_YET = "tests.test_carla_build:CarlaServerNotUpYet-v0"
STARTUP_TIMEOUT_S = 3.0


def _carla_without_a_server(**kwargs) -> CarlaDrivingEnv:
    """The CARLA env with the double of the client (a remote env runner imports this module
    through the id's prefix)."""
    return CarlaDrivingEnv(carla_module=FakeCarla(tcp=True), **kwargs)


if NO_SERVER_YET.split(":")[1] not in gym.registry:
    gym.register(NO_SERVER_YET.split(":")[1], entry_point=_carla_without_a_server)


def test_N2_the_algorithm_builds_while_every_runners_carla_server_is_still_starting(ray_local, tmp_path):
    with socket.socket() as not_up:
        not_up.bind(("127.0.0.1", 0))  # bound, not listening: a server that is not up yet
        endpoint = f"127.0.0.1:{not_up.getsockname()[1]}"
        kwargs = {"npc_vehicles": 0, "server": {"mode": "external", "external": [endpoint],
                                                 "startup_timeout_s": STARTUP_TIMEOUT_S, "probe_timeout_s": 1.0}}
        exp = load_config(ROOT / "configs" / "driving_carla_td3.yaml", [
            f"env.id={NO_SERVER_YET}", f"env.kwargs={json.dumps(kwargs)}", f"experiment.output_dir={tmp_path}",
            "resources.num_env_runners=1", "resources.num_learners=0", "resources.num_gpus_per_learner=0",
            "resources.learner_torch_threads=1", "resources.sample_timeout_s=5", "resources.async_sampling=false",
            "evaluation.video=false",
        ])
        algo = build_td3_config(exp).build_algo()
        try:
            # Runner 1 answered with its env made, without waiting for the server.
            assert algo.env_runner_group.num_healthy_remote_workers() == 1
        finally:
            algo.stop()
