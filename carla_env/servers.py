"""CARLA servers: launched and restarted by the env that uses them, or found already running.

Each CARLA env runs inside a Ray env runner (an actor Ray restarts if it dies) and owns one
server handle:

- `ManagedServer` launches `CarlaUE4.sh` off-screen, without sound, on the env's own ports and
  GPU, waits until its RPC port answers, and restarts it when the process has died or a tick
  timed out (a hung server is killed first).
- `ExternalServer` connects to a `host:port` that someone else runs (a Kubernetes sidecar);
  when it fails, it waits for the server to answer again instead of restarting it.

`claim_external_endpoint` hands each env a different external server, across processes, through
a named Ray actor: one for the job, or one per node for sidecar servers (Kubernetes: k8s/).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections import deque
from pathlib import Path

from carla_env.config import ServerSection
from carla_env.ports import ServerPorts

EXECUTABLE = "CarlaUE4.sh"


class ServerError(RuntimeError):
    """A CARLA server could not be found, started or reached."""


def find_executable(server: ServerSection) -> Path:
    root = server.carla_root or os.environ.get("CARLA_ROOT")
    if not root:
        raise ServerError(
            "managed CARLA servers need a CARLA install: set CARLA_ROOT or env.kwargs.server."
            "carla_root to its folder, or use env.kwargs.server.mode: external"
        )
    path = Path(root) / EXECUTABLE
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ServerError(f"{path} is not an executable file (CARLA root: {root})")
    return path


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something holds the port. SO_REUSEADDR, as servers bind: connections of a
    crashed server still in TIME_WAIT do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def answers(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


class ManagedServer:
    host = "127.0.0.1"

    def __init__(self, server: ServerSection, ports: ServerPorts, gpu: int, log_path: Path):
        self.config, self.ports, self.gpu, self.log_path = server, ports, gpu, log_path
        self.executable = find_executable(server)
        self.process: subprocess.Popen | None = None
        self.restarts = 0

    @property
    def rpc_port(self) -> int:
        return self.ports.rpc

    def command(self) -> list[str]:
        return [
            str(self.executable),
            "-RenderOffScreen",
            "-nosound",
            f"-carla-rpc-port={self.ports.rpc}",
            f"-carla-streaming-port={self.ports.streaming}",
            f"-carla-secondary-port={self.ports.secondary}",
            f"-graphicsadapter={self.gpu}",
            f"-quality-level={self.config.quality_level}",
        ]

    def start(self) -> None:
        for port in (self.ports.rpc, self.ports.streaming, self.ports.secondary):
            if port_in_use(port):
                raise ServerError(
                    f"port {port} is already in use: another CARLA server or program holds it "
                    f"(this server's ports: {self.ports}); stop it or change server.base_rpc_port"
                )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # Its own session: stopping it also stops the UE4 binary the script launches.
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + self.config.startup_timeout_s
        while not answers(self.host, self.ports.rpc):
            if self.process.poll() is not None:
                raise ServerError(
                    f"CARLA server on port {self.ports.rpc} exited with code "
                    f"{self.process.returncode} while starting; its log ends:\n{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(
                    f"CARLA server on port {self.ports.rpc} did not answer within "
                    f"{self.config.startup_timeout_s:g} s; its log ends:\n{self._log_tail()}"
                )
            time.sleep(0.2)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def recover(self) -> None:
        """After a crash or a tick timeout: kill whatever is left and start again."""
        if self.restarts >= self.config.max_restarts:
            raise ServerError(
                f"CARLA server on port {self.ports.rpc} failed again after "
                f"{self.restarts} restarts (server.max_restarts); its log ends:\n{self._log_tail()}"
            )
        self.stop(graceful=False)  # a hung server would not act on SIGTERM
        self.restarts += 1
        self.start()

    def stop(self, graceful: bool = True) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        signals = ((signal.SIGTERM, 10.0),) if graceful else ()
        for sig, wait_s in (*signals, (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def _log_tail(self, lines: int = 20) -> str:
        if not self.log_path.is_file():
            return "(no log)"
        with open(self.log_path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines)) or "(empty log)"


class ExternalServer:
    def __init__(self, server: ServerSection, endpoint: str):
        self.config = server
        self.host, port = endpoint.rsplit(":", 1)
        self.rpc_port = int(port)
        self.restarts = 0  # reconnections after a failure; we never restart someone's server

    def start(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while not answers(self.host, self.rpc_port):
            if time.monotonic() > deadline:
                raise ServerError(
                    f"external CARLA server {self.host}:{self.rpc_port} did not answer within "
                    f"{self.config.startup_timeout_s:g} s"
                )
            time.sleep(0.5)

    def recover(self) -> None:
        if self.restarts >= self.config.max_restarts:
            raise ServerError(
                f"external CARLA server {self.host}:{self.rpc_port} failed "
                f"{self.restarts + 1} times (server.max_restarts={self.config.max_restarts})"
            )
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        pass


class _EndpointPool:
    def __init__(self, endpoints: list[str]):
        self.free = list(endpoints)

    def claim(self) -> str | None:
        return self.free.pop(0) if self.free else None

    def release(self, endpoint: str) -> None:
        if endpoint not in self.free:
            self.free.append(endpoint)


_LOCAL_POOLS: dict[tuple[str, ...], _EndpointPool] = {}
POOL_ACTOR = "carla_external_endpoints"


def _pool(endpoints: list[str], scope: str):
    """(claim, release) callables of the pool shared by every process of this Ray job, or of
    this node (scope "node": each node's sidecar servers answer at the same local addresses)."""
    import ray

    if not ray.is_initialized():
        pool = _LOCAL_POOLS.setdefault(tuple(endpoints), _EndpointPool(endpoints))
        return pool.claim, pool.release
    name = POOL_ACTOR
    if scope == "node":
        name += "_" + ray.get_runtime_context().get_node_id()
    actor = (
        ray.remote(num_cpus=0)(_EndpointPool)
        .options(name=name, get_if_exists=True)
        .remote(endpoints)
    )
    return (lambda: ray.get(actor.claim.remote())), (lambda e: ray.get(actor.release.remote(e)))


def claim_external_endpoint(server: ServerSection) -> tuple[str, callable]:
    """A `host:port` from `server.external` that no other env of this job holds, and the
    function that gives it back."""
    claim, release = _pool(server.external, server.external_scope)
    endpoint = claim()
    if endpoint is None:
        raise ServerError(
            f"all {len(server.external)} external CARLA servers (env.kwargs.server.external) "
            "are taken by other envs: list one per env (env runners x envs per runner, plus "
            "one for evaluation)"
        )
    return endpoint, lambda: release(endpoint)
