"""`SupervisedSimulator`: a CARLA client and its server, replaced together when the server is lost.

The `Simulator` a CARLA env uses. A lost server (`ServerLost`: a tick or camera timeout, a
dropped connection, the client process dying) costs the episode, which ends truncated
(`SimulatorInterrupted`); the server handle restarts the server or waits for it, and a new
client connects. Errors while reconnecting are losses too, up to the server's `max_restarts`;
past it `ServerError` ends the env, and RLlib re-creates it (or replaces its env runner).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from carla_env.contract import Measurements
from carla_env.driving_env import SimulatorInterrupted
from carla_env.servers import ServerError, ServerLost

# ServerLost.counter values, reported as env/<counter> (callbacks/driving_metrics.py).
LOSS_COUNTERS = ("tick_timeouts", "sensor_timeouts", "reset_failures", "step_failures",
                 "connect_failures", "client_failures")
TIME_KEYS = ("ticks", "wall_seconds", "sim_seconds")


class SupervisedSimulator:
    def __init__(self, server, connect: Callable[[], object], restart_every_episodes: int = 0):
        """`server`: a handle from carla_env/servers.py (or a test's); `connect()`: a new client
        for the server as it is now (its ports can change at a restart)."""
        self.server, self._connect = server, connect
        self.restart_every_episodes = restart_every_episodes
        self._losses = dict.fromkeys(LOSS_COUNTERS, 0)
        self._retired = dict.fromkeys(TIME_KEYS, 0.0)
        self._episodes = 0
        self.client = None
        self._started = False

    def _start(self) -> None:
        """At the first reset, not when the env is made: RLlib (2.60) builds the algorithm by
        making every env runner's env and asking runner 1 for its spaces, so a server still
        starting (an image pulled on a cold node, five servers warming up on one GPU) would fail
        the build instead of delaying the first sample."""
        self.server.start()
        try:
            self._reconnect()
        except BaseException:
            self.server.stop()
            raise
        self._started = True

    def reset(self, seed: int | None) -> tuple[np.ndarray, Measurements]:
        if not self._started:
            self._start()
        elif self.restart_every_episodes and self._episodes and self._episodes % self.restart_every_episodes == 0:
            self._retire_client()
            self.server.restart()  # against the server's memory growth; not a failure
            self._reconnect()
        while True:
            try:
                result = self.client.reset(seed)
                self._episodes += 1
                return result
            except ServerLost as lost:
                self._recover(lost)

    def view(self) -> np.ndarray | None:
        """The chase view of the last step (None without one, or when the client is gone: the
        next step recovers it)."""
        try:
            return self.client.view() if self.client is not None else None
        except ServerLost:
            return None

    def step(self, action: np.ndarray) -> tuple[np.ndarray, Measurements]:
        try:
            return self.client.step(action)
        except ServerLost as lost:
            self._recover(lost)
            raise SimulatorInterrupted(f"{lost}; server recovered") from lost

    def health(self) -> dict[str, float]:
        now = self.client.health() if self.client is not None else {}
        total = {k: self._retired[k] + now.get(k, 0.0) for k in TIME_KEYS}
        wall = total["wall_seconds"]
        return {
            **self._losses,
            "server_restarts": self.server.restarts,
            "ticks": total["ticks"],
            "sim_fps": total["ticks"] / wall if wall else 0.0,  # ticks per wall second
            "sim_speedup": total["sim_seconds"] / wall if wall else 0.0,  # sim s per wall s
        }

    def close(self) -> None:
        try:
            if self.client is not None:
                self.client.close()
        finally:
            self.server.stop()

    def _recover(self, lost: ServerLost) -> None:
        self._losses[lost.counter] += 1
        self._retire_client()
        self._recover_server(lost)
        self._reconnect()

    def _recover_server(self, lost: ServerLost) -> None:
        try:
            self.server.recover()
        except ServerError as e:  # past server.max_restarts: the env gives up
            raise ServerError(f"{e}\nthe failure that needed a restart: {lost}") from lost

    def _reconnect(self) -> None:
        while True:
            try:
                self.client = self._connect()
                return
            except ServerLost as lost:  # e.g. a server that answered, then failed loading the map
                self._losses[lost.counter] += 1
                self._recover_server(lost)

    def _retire_client(self) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        last = client.health()
        for k in TIME_KEYS:
            self._retired[k] += last.get(k, 0.0)
        getattr(client, "kill", client.close)()  # a client process dies; one in-process cleans up
