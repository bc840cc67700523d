"""The CARLA client of one env, in a process of its own.

The carla client keeps process-wide state bound to the first server it talks to: the Traffic
Manager of a port is one object per process whose C++ thread calls that server with no error
handling, so when the server dies the whole process can abort (carla#4577, #4072, #6748), and a
new connection on the same port gets the stale one back. Running `CarlaSimulator` in a child
process makes both harmless: an abort ends the child, which `ClientProcess` reports as
`ServerLost`, and every reconnection starts a fresh child with fresh client state.

The child is started with `python -m carla_env.client_process FD` (not multiprocessing, which
would re-import the parent's main module: a Ray worker's) and speaks over a socket pair. It
ignores Ctrl-C (its parent closes it), and exits, cleaning up its actors, when its parent is gone.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import traceback
from multiprocessing.connection import Connection

from carla_env.carla_sim import OUR_ROLE
from carla_env.config import CarlaEnvConfig
from carla_env.servers import ServerLost

SETTLE_S = 5.0  # for replies that involve no server call (health, close), and for exits


class ClientProcess:
    """`CarlaSimulator(config, host, rpc_port, tm_port, view=view, role=role)` in a child process,
    same methods."""

    def __init__(self, config: CarlaEnvConfig, host: str, rpc_port: int, tm_port: int, carla_module=None,
                 view: bool = False, role: str = OUR_ROLE):
        self.config = config
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "carla_env.client_process", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), env=env,
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._health: dict[str, float] = {}
        self._conn.send((config.model_dump(), host, rpc_port, tm_port, carla_module, view, role))
        server = config.server
        # Backstops for a child stuck where its own client timeouts do not reach.
        self._slow_call_s = 4 * server.connect_timeout_s + SETTLE_S
        self._step_s = (config.physics_steps_per_control_step + 2) * server.tick_timeout_s + SETTLE_S
        try:
            self._call("connect", timeout_s=self._slow_call_s)
        except BaseException:
            self.kill()
            raise

    def reset(self, seed):
        return self._call("reset", seed, timeout_s=self._slow_call_s)

    def step(self, action):
        return self._call("step", action, timeout_s=self._step_s)

    def view(self):
        return self._call("view", timeout_s=SETTLE_S)

    def health(self) -> dict[str, float]:
        """The last counters the child reported; they outlive it."""
        if self._process.poll() is None:
            try:
                self._health = self._call("health", timeout_s=SETTLE_S)
            except ServerLost:
                pass
        return self._health

    def close(self) -> None:
        try:
            if self._process.poll() is None:
                self._call("close", timeout_s=self._slow_call_s)
                self._process.wait(SETTLE_S)
        except (ServerLost, subprocess.TimeoutExpired):
            pass
        finally:
            self.kill()

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        if not self._conn.closed:
            self._conn.close()

    def _call(self, method: str, *args, timeout_s: float):
        try:
            self._conn.send((method, args))
            if not self._conn.poll(timeout_s):
                self.kill()
                raise ServerLost("client_failures", f"the CARLA client process did not answer {method}() within {timeout_s:g} s")
            kind, value = self._conn.recv()
        except (EOFError, OSError):
            self._conn.close()
            self.kill()
            code = self._process.returncode
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            raise ServerLost("client_failures", f"the CARLA client process died during {method}() ({how})") from None
        if kind == "ok":
            return value
        raise value


def _sendable(error: BaseException) -> BaseException:
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"in the CARLA client process: {''.join(traceback.format_exception(error))}")


def serve(fd: int) -> None:
    from carla_env.carla_sim import CarlaSimulator

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    config, host, rpc_port, tm_port, carla_module, view, role = conn.recv()
    config = CarlaEnvConfig.model_validate(config)
    simulator = None
    try:
        while True:
            try:
                method, args = conn.recv()
            except EOFError:
                return  # the env's process is gone
            try:
                if method == "connect":
                    simulator, result = CarlaSimulator(config, host, rpc_port, tm_port, carla_module, view, role), None
                elif method == "close":
                    simulator.close()
                    simulator = None
                    conn.send(("ok", None))
                    return
                else:
                    result = getattr(simulator, method)(*args)
            except Exception as e:  # ServerLost, ServerError, bugs: the env decides
                conn.send(("error", _sendable(e)))
                continue
            conn.send(("ok", result))
    finally:
        if simulator is not None:
            simulator.close()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
