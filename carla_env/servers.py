"""CARLA servers: launched and restarted by the env that uses them, or found already running.

Each CARLA env runs inside a Ray env runner (an actor Ray restarts if it dies) and owns one
server handle:

- `ManagedServer` launches `CarlaUE4.sh` off-screen, without sound, on the env's own ports and
  GPU, waits until the server's game thread answers a call, and restarts it when the process has
  died or hung (a hung server is killed first). A server left behind by a runner that died
  without cleaning up (`CarlaUE4.sh` keeps the UE binary as its child, in its own session, so
  nothing kills it) is stopped by its watchdog (`server_watchdog.py`) within seconds, wherever
  Ray starts the runner's replacement; should the watchdog be gone too, the record the server left
  in `log_dir` gets it killed before its ports are reused. Ports another live run holds are left
  alone and this server moves up one block.
- `ExternalServer` connects to a `host:port` that someone else runs (a Kubernetes sidecar);
  when it fails, it waits for the server to answer again instead of restarting it.

"Answers" always means the game thread answered (`world.get_settings()`): a hung server still
accepts TCP connections and answers the calls CARLA serves off its game thread (map list,
version), so neither says it is alive.

`claim_external_endpoint` hands each env a different external server, across processes, through
a named Ray actor that the driver opens (`open_endpoint_pools`, from rl/train.py): one per list
of servers, or one per node for sidecar servers (Kubernetes: k8s/).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from carla_env import procfs
from carla_env.config import ServerSection
from carla_env.ports import ServerPorts, server_ports
from carla_env.server_watchdog import server_members, stop_group

EXECUTABLE = "CarlaUE4.sh"
GRACEFUL_STOP_S = 10.0  # for UE to act on SIGTERM before the group is killed
WATCHDOG_START_S = 60.0  # for a server's watchdog to start (a Python start-up on a busy node)


class ServerError(RuntimeError):
    """A CARLA server could not be found, started or reached: the env cannot go on."""


class ServerLost(RuntimeError):
    """A call to the server failed (timeout, connection gone): this client is done with it.
    `counter` names the health counter it adds to (tick_timeouts, sensor_timeouts, ...)."""

    def __init__(self, counter: str, message: str):
        super().__init__(message)
        self.counter = counter

    def __reduce__(self):  # crosses the client process's pipe
        return ServerLost, (self.counter, str(self))


def import_carla(spec: str | None = None):
    """The CARLA client module; `spec` ("pkg.mod:factory", the CLIs' hidden --carla-module) names
    a stand-in built by calling that factory instead (the tests' double)."""
    if spec:
        module, _, factory = spec.partition(":")
        return getattr(importlib.import_module(module), factory)()
    try:
        return importlib.import_module("carla")
    except ImportError:
        raise ImportError(
            "the CARLA backend needs the CARLA client: pip install 'carla==0.9.16' "
            "(or pip install -e '.[carla]')"
        ) from None


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


def accepts_connections(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Only that the port is open: true of a hung server too (the kernel accepts for it)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def game_thread_answers(carla, host: str, port: int, timeout_s: float) -> str | None:
    """None if the server's game thread answered `get_settings`; else why not. A short-lived
    client with no Traffic Manager, so nothing of it outlives the call."""
    try:
        client = carla.Client(host, port, 1)
        client.set_timeout(float(timeout_s))
        client.get_world().get_settings()
        return None
    except RuntimeError as e:
        return str(e) or type(e).__name__


def wait_until_answers(carla, host: str, port: int, server: ServerSection, died=None) -> None:
    """Waits until the game thread answers, at most `startup_timeout_s`. `died()` -> an error
    message stops the wait early (a managed server that exited)."""
    deadline = time.monotonic() + server.startup_timeout_s
    why = "the port never opened"
    while True:
        if died is not None and (message := died()):
            raise ServerError(message)
        if accepts_connections(host, port):
            probe_s = min(server.probe_timeout_s, max(deadline - time.monotonic(), 0.1))
            if (why := game_thread_answers(carla, host, port, probe_s)) is None:
                return
        if time.monotonic() > deadline:
            raise ServerError(
                f"CARLA server {host}:{port} did not answer within {server.startup_timeout_s:g} s ({why})"
            )
        time.sleep(0.2)


# --- Servers of runners that died: records in log_dir ----------------------------------------


class ServerRecord:
    """`carla_<rpc port>.json` in log_dir: which process group serves the port, for whom."""

    def __init__(self, log_dir: Path, rpc_port: int):
        self.path = log_dir / f"carla_{rpc_port}.json"
        self.rpc_port = rpc_port

    def write(self, pgid: int) -> None:
        record = {"pgid": pgid, "owner_pid": os.getpid(), "owner_start": procfs.start_time(os.getpid())}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def kill_if_stale(self) -> bool:
        """Kills the server this record names if its owner is gone (or is this process, whose
        envs release a slot only when closed); True if one was killed."""
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return False
        owner_alive = procfs.start_time(record["owner_pid"]) == record["owner_start"]
        if owner_alive and record["owner_pid"] != os.getpid():
            return False  # another live run's server: not ours to kill
        members = server_members(record["pgid"], self.rpc_port)
        if members:
            stop_group(record["pgid"], grace_s=0.0)
        self.remove()
        return bool(members)


# --- Logs and GPUs ------------------------------------------------------------------------


class LogPump:
    """Copies a server's output to its log file, starting a new file past `max_bytes` (one older
    file kept): CARLA can print errors without end."""

    def __init__(self, stream, path: Path, max_bytes: int):
        self.stream, self.path, self.max_bytes = stream, path, max_bytes
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"carla-log-{path.name}")
        self._thread.start()

    def _run(self) -> None:
        log = open(self.path, "ab")
        try:
            while chunk := os.read(self.stream.fileno(), 65536):
                if log.tell() + len(chunk) > self.max_bytes:
                    log.close()
                    self.path.replace(self.path.with_name(self.path.name + ".1"))
                    log = open(self.path, "ab")
                log.write(chunk)
                log.flush()
        except OSError:
            pass
        finally:
            log.close()
            self.stream.close()

    def join(self, timeout_s: float = 5.0) -> None:
        self._thread.join(timeout_s)


def graphics_adapter(server: ServerSection, ordinal: int) -> int:
    """The Vulkan adapter index for `-graphicsadapter`. Vulkan ignores CUDA_VISIBLE_DEVICES and
    lists NVIDIA GPUs in PCI bus order, as `nvidia-smi` numbers them. Ray gives a process its GPU
    as a CUDA ordinal in CUDA_VISIBLE_DEVICES, and CUDA's default order is fastest first: the
    same as the bus order only among identical GPUs, or with CUDA_DEVICE_ORDER=PCI_BUS_ID (which
    rl.train sets for a Ray it starts, and k8s/raycluster.yaml for the cluster)."""
    if server.gpus != "ray":
        return server.gpus[ordinal % len(server.gpus)]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if not visible or visible in ("NoDevFiles", "-1"):
        return 0
    first = visible.split(",")[0].strip()
    try:
        rows = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,uuid,name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return int(first) if first.isdigit() else 0
    gpus = [[field.strip() for field in row.split(",", 2)] for row in rows]
    for index, uuid, _ in gpus:
        if first == uuid:
            return int(index)
    if not first.isdigit():
        return 0
    models = sorted({name for *_, name in gpus})
    if os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID" and len(models) > 1:
        raise ServerError(
            f"CUDA_VISIBLE_DEVICES={visible} is a CUDA ordinal in CUDA's fastest-first order, which on "
            f"this node's mixed GPUs ({', '.join(models)}) is not the PCI bus order of Vulkan's adapters: "
            "set CUDA_DEVICE_ORDER=PCI_BUS_ID in the environment the Ray nodes start with, or list the "
            "adapters in env.kwargs.server.gpus"
        )
    return int(first)


# --- Server handles ------------------------------------------------------------------------


class ManagedServer:
    host = "127.0.0.1"

    def __init__(self, server: ServerSection, ordinal: int, carla_module=None):
        self.config, self.ordinal = server, ordinal
        self.carla = carla_module or import_carla()
        self.executable = find_executable(server)
        self.log_dir = Path(server.log_dir)
        self.gpu = graphics_adapter(server, ordinal)
        self.process: subprocess.Popen | None = None
        self.ports: ServerPorts | None = None
        self.restarts = 0
        self._pump: LogPump | None = None
        self._watchdog: tuple[int, int] | None = None  # pid, start time

    @property
    def rpc_port(self) -> int:
        return self.ports.rpc

    @property
    def tm_port(self) -> int:
        return self.ports.traffic_manager

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"carla_{self.ports.rpc}.log"

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

    def _claim_ports(self) -> ServerPorts:
        """The first block whose ports are free, after killing servers that runners which
        died left on them."""
        cfg, taken = self.config, []
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for block in range(cfg.max_port_blocks):
            ports = server_ports(self.ordinal, cfg, block)
            ServerRecord(self.log_dir, ports.rpc).kill_if_stale()
            busy = [p for p in ports.all() if port_in_use(p)]
            if not busy:
                return ports
            taken.append(f"{ports.rpc}-{ports.secondary}/{ports.traffic_manager} ({', '.join(map(str, busy))} in use)")
        raise ServerError(
            f"no free ports for CARLA slot {self.ordinal} in {cfg.max_port_blocks} blocks "
            f"(server.max_port_blocks): {'; '.join(taken)}; other programs or runs hold them"
        )

    def start(self) -> None:
        self.ports = self._claim_ports()
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        record = ServerRecord(self.log_dir, self.ports.rpc)
        record.write(self.process.pid)
        self._pump = LogPump(self.process.stdout, self.log_path, int(self.config.log_max_mb * 2**20))
        try:
            self._watchdog = self._start_watchdog(record)
        except ServerError:
            self.stop(graceful=False)
            raise

        def exited() -> str | None:
            if self.process.poll() is None:
                return None
            self._pump.join()
            return (
                f"CARLA server on port {self.ports.rpc} exited with code {self.process.returncode} "
                f"while starting; its log ends:\n{self._log_tail()}"
            )

        try:
            wait_until_answers(self.carla, self.host, self.ports.rpc, self.config, exited)
        except ServerError as e:
            exited_by_itself = self.process.poll() is not None
            self.stop(graceful=False)
            if exited_by_itself:
                raise
            raise ServerError(f"{e}; its log ends:\n{self._log_tail()}") from None

    def _start_watchdog(self, record: ServerRecord) -> tuple[int, int]:
        """Stops this server if this process dies, wherever its replacement runs (N6). Returns
        the watchdog's pid and start time: it is no child of ours (it detaches)."""
        owner = os.getpid()
        command = [
            sys.executable, "-m", "carla_env.server_watchdog", "--owner-pid", str(owner),
            "--owner-start", str(procfs.start_time(owner)), "--pgid", str(self.process.pid),
            "--rpc-port", str(self.ports.rpc), "--record", str(record.path.resolve()),
            "--poll-s", str(self.config.owner_check_s), "--grace-s", str(GRACEFUL_STOP_S),
        ]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        log = self.log_dir / f"watchdog_{self.ports.rpc}.log"
        try:
            with open(log, "ab") as stderr:
                said = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                                      env=env, text=True, timeout=WATCHDOG_START_S, check=True).stdout
            pid, start = (int(x) for x in said.split())
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            raise ServerError(f"the watchdog of the CARLA server on port {self.ports.rpc} did not start "
                              f"({e}); see {log}") from None
        return pid, start

    def _stop_watchdog(self) -> None:
        if self._watchdog is None:
            return
        pid, start = self._watchdog
        self._watchdog = None
        if procfs.start_time(pid) == start:  # not a process that reused its pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 10.0
            while procfs.alive(pid) and time.monotonic() < deadline:
                time.sleep(0.01)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def restart(self) -> None:
        """A fresh server, not a failure: CARLA's memory grows over many episodes."""
        self.stop()
        self.start()

    def recover(self) -> None:
        """After a crash or a hang: kill whatever is left and start again."""
        if self.restarts >= self.config.max_restarts:
            raise ServerError(
                f"CARLA server on port {self.ports.rpc} failed again after "
                f"{self.restarts} restarts (server.max_restarts); its log ends:\n{self._log_tail()}"
            )
        self.stop(graceful=False)  # a hung server would not act on SIGTERM
        self.restarts += 1
        self.start()

    def stop(self, graceful: bool = True) -> None:
        """Stops the whole process group: the launcher script and the UE binary it started.
        Graceful: SIGTERM, and UE gets `GRACEFUL_STOP_S` to exit before SIGKILL. The launcher
        dies at once, so what is waited for is the group, not the launcher."""
        if self.process is None:
            return
        self._stop_watchdog()  # this process stops the server: no second stopper
        # poll() reaps the launcher, our child; UE, reparented, is reaped by init
        stop_group(self.process.pid, GRACEFUL_STOP_S if graceful else 0.0, reap=self.process.poll)
        self.process.wait()
        if self._pump is not None:
            self._pump.join()
        ServerRecord(self.log_dir, self.ports.rpc).remove()

    def _log_tail(self, lines: int = 20) -> str:
        if not self.log_path.is_file():
            return "(no log)"
        with open(self.log_path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines)) or "(empty log)"


class ExternalServer:
    def __init__(self, server: ServerSection, endpoint: str, ordinal: int, carla_module=None):
        self.config, self.ordinal = server, ordinal
        self.carla = carla_module or import_carla()
        self.host, port = endpoint.rsplit(":", 1)
        self.rpc_port = int(port)
        self.restarts = 0  # reconnections after a failure; we never restart someone's server
        self.tm_port = self._free_tm_port()

    def _free_tm_port(self) -> int:
        """The Traffic Manager listens in our client process: a port another run on this node
        holds would make ours its remote client, silently sharing its traffic."""
        for block in range(self.config.max_port_blocks):
            port = server_ports(self.ordinal, self.config, block).traffic_manager
            if not port_in_use(port):
                return port
        raise ServerError(f"no free Traffic Manager port for CARLA slot {self.ordinal} in {self.config.max_port_blocks} blocks")

    def start(self) -> None:
        try:
            wait_until_answers(self.carla, self.host, self.rpc_port, self.config)
        except ServerError as e:
            raise ServerError(f"external {e}") from None

    def recover(self) -> None:
        if self.restarts >= self.config.max_restarts:
            raise ServerError(
                f"external CARLA server {self.host}:{self.rpc_port} failed "
                f"{self.restarts + 1} times (server.max_restarts={self.config.max_restarts})"
            )
        self.restarts += 1
        self.start()

    def restart(self) -> None:
        self.start()  # not ours to restart: only checks that it answers

    def stop(self) -> None:
        pass


class _EndpointPool:
    """Endpoints free and held. A claim made through Ray carries the claimant's token: a list
    holding an object that its process owns (`_pool`). Ray loses an object whose owner
    died, so a holder whose token is lost is dead: its endpoint goes back to the pool when a
    claim finds none free. A runner Ray replaced (an OOM kill, a segfault: no close()) thus
    leaves its server to its successor, not idle for the rest of the run."""

    LIVENESS_TIMEOUT_S = 5.0

    def __init__(self, endpoints: list[str]):
        self.free = list(endpoints)
        self.holders: dict[str, list] = {}  # endpoint -> its claimant's token

    def claim(self, token: list | None = None) -> str | None:
        if not self.free:
            self._reclaim_from_dead_holders()
        if not self.free:
            return None
        endpoint = self.free.pop(0)
        if token is not None:
            self.holders[endpoint] = token
        return endpoint

    def release(self, endpoint: str) -> None:
        self.holders.pop(endpoint, None)
        if endpoint not in self.free:
            self.free.append(endpoint)

    def _reclaim_from_dead_holders(self) -> None:
        import ray

        for endpoint, token in list(self.holders.items()):
            try:
                ray.get(token[0], timeout=self.LIVENESS_TIMEOUT_S)
            except ray.exceptions.ObjectLostError:  # OwnerDiedError: its process is gone
                self.release(endpoint)
            except ray.exceptions.GetTimeoutError:
                pass  # no answer is not proof of death: it keeps its endpoint


_LOCAL_POOLS: dict[tuple[str, ...], _EndpointPool] = {}
# Ray learns that a process died about a second after it did, and restarts a runner's actor at
# once: its claim may come first, so a claim that finds every endpoint held asks again meanwhile.
DEAD_HOLDER_WAIT_S = 5.0
POOL_ACTOR = "carla_external_endpoints"


def _pool_name(endpoints: list[str], scope: str, node_id: str | None = None) -> str:
    """One pool per list of endpoints (two env configs in one job do not share), and per node
    for scope "node" (each node's sidecar servers answer at the same local addresses)."""
    import ray

    name = f"{POOL_ACTOR}_{hashlib.sha1(','.join(endpoints).encode()).hexdigest()[:12]}"
    if scope == "node":
        name += f"_{node_id or ray.get_runtime_context().get_node_id()}"
    return name


def _pool(endpoints: list[str], scope: str):
    """(claim, release, seconds to retry a failed claim) of the pool that the driver opened for
    this Ray job (`open_endpoint_pools`; named actors live in the job's namespace); without one
    (no Ray, or envs made outside rl.train), this process's own pool."""
    try:
        import ray

        actor = ray.get_actor(_pool_name(endpoints, scope)) if ray.is_initialized() else None
    except ValueError:  # no actor of that name
        actor = None
    if actor is None:
        pool = _LOCAL_POOLS.setdefault(tuple(endpoints), _EndpointPool(endpoints))
        return pool.claim, pool.release, 0.0

    def claim() -> str | None:
        # An object this process owns, in a list so that the pool gets the reference, not the
        # value: the pool holds it, and Ray keeps it for as long as this process lives.
        return ray.get(actor.claim.remote([ray.put(os.getpid())]))

    return claim, (lambda e: ray.get(actor.release.remote(e))), DEAD_HOLDER_WAIT_S


def open_endpoint_pools(server: ServerSection) -> list:
    """Makes the job's pools of external endpoints from the driver, before any env claims one.
    A Ray actor dies with the process that made it: made by the first env runner to claim, the
    pool, and which endpoints are taken, would go down with that runner. Returns the actors:
    the driver keeps them for the run."""
    import ray

    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]] if server.external_scope == "node" else [None]
    return [
        ray.remote(num_cpus=0)(_EndpointPool)
        .options(name=_pool_name(server.external, server.external_scope, node), get_if_exists=True)
        .remote(server.external)
        for node in nodes
    ]


def claim_external_endpoint(server: ServerSection) -> tuple[str, callable]:
    """A `host:port` from `server.external` that no other live env of this job holds, and the
    function that gives it back (close()); the driver's pool also takes it back once this
    process is dead (`_EndpointPool`)."""
    claim, release, wait_s = _pool(server.external, server.external_scope)
    deadline = time.monotonic() + wait_s
    while (endpoint := claim()) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    if endpoint is None:
        raise ServerError(
            f"all {len(server.external)} external CARLA servers (env.kwargs.server.external) "
            "are taken by other envs: list one per env (env runners x envs per runner, plus "
            "one for evaluation)"
        )
    return endpoint, lambda: release(endpoint)
