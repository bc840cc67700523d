"""`CarlaDrivingEnv`: the CARLA backend behind the shared contract, with its server.

gymnasium id `carla_env:CarlaDriving-v0`; kwargs: CarlaEnvConfig's fields. Under RLlib the
experiment registers it with Ray Tune's env registry (rl/experiment.py) so the env learns its
env runner's `worker_index`, from which its server's ports follow (carla_env/ports.py).

The env = the contract (DrivingEnv) over a SupervisedSimulator: a server handle (managed or
external) and a CARLA client in its own process (carla_env/client_process.py).
"""

from __future__ import annotations

import os
from typing import Any

from carla_env.carla_sim import OUR_ROLE
from carla_env.client_process import ClientProcess
from carla_env.config import CarlaEnvConfig, load_env_config
from carla_env.driving_env import DrivingEnv
from carla_env.ports import PROCESS_SLOTS, slot_ordinal
from carla_env.servers import ExternalServer, ManagedServer, claim_external_endpoint
from carla_env.supervised import SupervisedSimulator


def _run_id() -> str:
    """Names this run's actors on a shared server: the Ray job's id, the same in a runner that
    Ray restarts (it cleans up after the one that died); outside Ray, this process's id."""
    import ray

    return ray.get_runtime_context().get_job_id() if ray.is_initialized() else f"pid{os.getpid()}"


class CarlaDrivingEnv(DrivingEnv):
    def __init__(self, worker_index: int = 0, carla_module=None, render_mode: str | None = None, **kwargs: Any):
        """`carla_module`: a stand-in for the `carla` package (tests); it must pickle, as it
        goes to the client process."""
        config = load_env_config(CarlaEnvConfig, kwargs)
        self._claim = PROCESS_SLOTS.claim()
        self._release_endpoint = None
        try:
            ordinal = slot_ordinal(worker_index, self._claim, config.server)
            if config.server.mode == "managed":
                server = ManagedServer(config.server, ordinal, carla_module)
            else:
                endpoint, self._release_endpoint = claim_external_endpoint(config.server)
                server = ExternalServer(config.server, endpoint, ordinal, carla_module)

            role = f"{OUR_ROLE}_{_run_id()}"

            def connect() -> ClientProcess:
                # An env made to render (evaluation, with videos on) gets the chase camera.
                return ClientProcess(config, server.host, server.rpc_port, server.tm_port, carla_module,
                                     view=render_mode == "rgb_array", role=role)

            # An external server is not ours to restart: a periodic "restart" would only kill
            # our client, leaving its actors and Traffic Manager registration on the server.
            every = config.server.restart_every_episodes if config.server.mode == "managed" else 0
            simulator = SupervisedSimulator(server, connect, every)
        except BaseException:
            self._give_back_slot()
            raise
        super().__init__(simulator, config, render_mode)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._give_back_slot()

    def _give_back_slot(self) -> None:
        PROCESS_SLOTS.release(self._claim)
        if self._release_endpoint is not None:
            self._release_endpoint()
            self._release_endpoint = None
