"""Is a CARLA server alive? Asks its game thread (`world.get_settings()`), not its TCP port.

    python -m carla_env.probe --server 127.0.0.1:2000 [--timeout 10]    # exit 0 alive, 1 not
    python -m carla_env.probe --server 127.0.0.1:2000 --serve 8087      # HTTP GET /healthz: 200 or 503

Exit 2: an argument is invalid (one line says which), or the CARLA client cannot be imported.

A hung server still accepts TCP connections and answers the calls CARLA serves off its game
thread, so a `tcpSocket` probe never sees a hang. `--serve` is the Kubernetes liveness probe of
the CARLA sidecar (k8s/raycluster.yaml): a check runs in a fresh process, so a client that
aborts fails that one check, not the prober. One check runs at a time and concurrent requests
share its result (SharedCheck), so requests cannot add up processes past the container's memory.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from carla_env.servers import game_thread_answers, import_carla

MAX_TIMEOUT_S = 3600.0  # a liveness check waiting longer than an hour is a typo
FRESH_S = 1.0  # a check that ended this recently answers new requests too


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 5 and 1 <= int(text) <= 65535


def port_number(text: str) -> int:
    if not _is_port(text):
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {text!r}")
    return int(text)


def server_address(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not host or not _is_port(port):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port from 1 to 65535 (e.g. 127.0.0.1:2000), got {text!r}")
    return text


def timeout_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    # CARLA takes the timeout as unsigned milliseconds: -1 s was printed as 18446744073709550616 ms
    if not 0 < seconds <= MAX_TIMEOUT_S:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"expected seconds, more than 0 and at most {MAX_TIMEOUT_S:g}, got {text!r}")
    return seconds


def carla_factory(spec: str) -> str:
    """`pkg.mod:factory`, checked here so that a typo is an argument error, not a traceback (in
    every check's process, with --serve)."""
    module, _, name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name) if module and name else None
    except Exception as e:  # ImportError, AttributeError, or whatever the module raised
        raise argparse.ArgumentTypeError(f"cannot load {spec!r}: {type(e).__name__}: {e}") from None
    if not callable(factory):
        raise argparse.ArgumentTypeError(f"expected MODULE:FACTORY naming a function, got {spec!r}")
    return spec


def check(server: str, timeout_s: float, carla=None) -> str | None:
    host, port = server.rsplit(":", 1)
    return game_thread_answers(carla or import_carla(), host, int(port), timeout_s)


class SharedCheck:
    """Runs `check` for one request at a time and shares its result: a request that arrives while
    a check runs, or within `fresh_s` after one ended, gets that check's result. Each check forks
    a Python process (~20 MB): one per request let 30 concurrent requests take 618 MB, past the
    probe container's 512 Mi, and an OOM-killed probe fails CARLA's liveness probe, so the kubelet
    restarted a healthy server."""

    def __init__(self, check, fresh_s: float = FRESH_S):
        self._check, self._fresh_s = check, fresh_s
        self._lock = threading.Lock()  # held while a check runs: the others wait for its result
        self._result, self._ended = None, -math.inf

    def __call__(self):
        asked = time.monotonic()
        with self._lock:
            if self._ended < asked - self._fresh_s:
                self._result = self._check()
                self._ended = time.monotonic()
            return self._result


def serve(port: int, server: str, timeout_s: float, carla_module: str | None) -> None:
    command = [sys.executable, "-m", "carla_env.probe", "--server", server, "--timeout", str(timeout_s)]
    if carla_module:
        command += ["--carla-module", carla_module]

    def check_in_a_process() -> tuple[bool, str]:
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s + 30)
            return run.returncode == 0, (run.stdout + run.stderr).strip()[-500:]
        except subprocess.TimeoutExpired:
            return False, f"no answer within {timeout_s + 30:g} s"
        except OSError as e:  # no memory or process left to fork
            return False, f"could not start the check: {e}"

    shared = SharedCheck(check_in_a_process)

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path != "/healthz":
                self.send_error(404)
                return
            alive, why = shared()
            body = f"{'alive' if alive else 'not answering'}: {why}\n".encode()
            self.send_response(200 if alive else 503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # the kubelet asks every few seconds: no log line each time
            pass

    ThreadingHTTPServer(("0.0.0.0", port), Health).serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m carla_env.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True, type=server_address, help="host:port of the CARLA server")
    parser.add_argument("--timeout", type=timeout_seconds, default=10.0, help="seconds the game thread has to answer")
    parser.add_argument("--serve", type=port_number, default=None, metavar="PORT", help="answer HTTP GET /healthz on this port")
    parser.add_argument("--carla-module", type=carla_factory, default=None, help=argparse.SUPPRESS)  # tests: pkg.mod:factory
    args = parser.parse_args(argv)
    if args.carla_module is None and importlib.util.find_spec("carla") is None:
        # Refused at start: with --serve, every check would fail and the kubelet restart CARLA.
        parser.error("the CARLA client is not installed: pip install 'carla==0.9.16'")
    if args.serve is not None:
        try:
            serve(args.serve, args.server, args.timeout, args.carla_module)
        except OSError as e:  # the port is taken
            parser.error(f"--serve {args.serve}: {e.strerror or e}")
        return 0
    try:
        carla = import_carla(args.carla_module)
    except ImportError as e:  # installed, but broken
        parser.error(str(e))
    why = check(args.server, args.timeout, carla)
    print(f"{args.server}: {'alive' if why is None else 'not answering: ' + why}")
    return 0 if why is None else 1


if __name__ == "__main__":
    sys.exit(main())
