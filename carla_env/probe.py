"""Is a CARLA server alive? Asks its game thread (`world.get_settings()`), not its TCP port.

    python -m carla_env.probe --server 127.0.0.1:2000 [--timeout 10]    # exit 0 alive, 1 not
    python -m carla_env.probe --server 127.0.0.1:2000 --serve 8087      # HTTP GET /healthz: 200 or 503

A hung server still accepts TCP connections and answers the calls CARLA serves off its game
thread, so a `tcpSocket` probe never sees a hang. `--serve` is the Kubernetes liveness probe of
the CARLA sidecar (k8s/raycluster.yaml): each request checks in a fresh process, so a client
that aborts fails that one check, not the prober.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from carla_env.servers import game_thread_answers, import_carla


def check(server: str, timeout_s: float, carla=None) -> str | None:
    host, port = server.rsplit(":", 1)
    return game_thread_answers(carla or import_carla(), host, int(port), timeout_s)


def serve(port: int, server: str, timeout_s: float, carla_module: str | None) -> None:
    command = [sys.executable, "-m", "carla_env.probe", "--server", server, "--timeout", str(timeout_s)]
    if carla_module:
        command += ["--carla-module", carla_module]

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path != "/healthz":
                self.send_error(404)
                return
            try:
                run = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s + 30)
                alive, why = run.returncode == 0, (run.stdout + run.stderr).strip()[-500:]
            except subprocess.TimeoutExpired:
                alive, why = False, f"no answer within {timeout_s + 30:g} s"
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
    parser.add_argument("--server", required=True, help="host:port of the CARLA server")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds the game thread has to answer")
    parser.add_argument("--serve", type=int, default=None, metavar="PORT", help="answer HTTP GET /healthz on this port")
    parser.add_argument("--carla-module", default=None, help=argparse.SUPPRESS)  # tests: pkg.mod:factory
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve(args.serve, args.server, args.timeout, args.carla_module)
        return 0
    why = check(args.server, args.timeout, import_carla(args.carla_module))
    print(f"{args.server}: {'alive' if why is None else 'not answering: ' + why}")
    return 0 if why is None else 1


if __name__ == "__main__":
    sys.exit(main())
