"""`CarlaDrivingEnv`: the CARLA backend behind the shared contract, with its server.

gymnasium id `carla_env:CarlaDriving-v0`; kwargs: CarlaEnvConfig's fields. Under RLlib the
experiment registers it with Ray Tune's env registry (rl/experiment.py) so the env learns its
env runner's `worker_index`, from which its server's ports follow (carla_env/ports.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from carla_env.carla_sim import CarlaSimulator
from carla_env.config import CarlaEnvConfig, load_env_config
from carla_env.driving_env import DrivingEnv
from carla_env.ports import PROCESS_SLOTS, server_ports, slot_ordinal
from carla_env.servers import ExternalServer, ManagedServer, claim_external_endpoint

class CarlaDrivingEnv(DrivingEnv):
    def __init__(self, worker_index: int = 0, carla_module=None, **kwargs: Any):
        config = load_env_config(CarlaEnvConfig, kwargs)
        self._claim = PROCESS_SLOTS.claim()
        self._release_endpoint = None
        try:
            ordinal = slot_ordinal(worker_index, self._claim, config.server)
            ports = server_ports(ordinal, config.server)
            if config.server.mode == "managed":
                gpu = config.server.gpus[ordinal % len(config.server.gpus)]
                log = Path(config.server.log_dir) / f"carla_{ports.rpc}.log"
                server = ManagedServer(config.server, ports, gpu, log)
            else:
                endpoint, self._release_endpoint = claim_external_endpoint(config.server)
                server = ExternalServer(config.server, endpoint)
            server.start()
            try:
                simulator = CarlaSimulator(config, server, ports.traffic_manager, carla_module)
            except BaseException:
                server.stop()
                raise
        except BaseException:
            self._give_back_slot()
            raise
        super().__init__(simulator, config)

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
