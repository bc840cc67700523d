"""Stand-in for CARLA's UE4 server binary in tests: a process that listens like a server.

It binds the RPC port and, like CARLA, the streaming (rpc+1) and secondary (rpc+2) ports. Each
line a client (tests/fake_carla.py) sends is a request: `tick` (the reply is the next frame),
`settings` and `tm` are answered by the "game thread"; `maps` and `version` are answered off it,
as CARLA binds them asynchronously. So a killed stand-in refuses connections, a stopped one
(SIGSTOP) times out on everything, and one whose game thread hangs (SIGUSR1) still accepts
connections and answers `maps` while ticks time out: the three ways a real server fails.

FAKE_CARLA_MODE: "normal"; "exit" (logs a fatal line and exits 3 while starting);
"silent" (runs but never listens: a server that never comes up); "spam" (writes a line of log
every millisecond, as CARLA's error spam does).

SIGTERM is handled as UE handles it, by a graceful exit: it logs "shutting down", takes
FAKE_CARLA_SHUTDOWN_S seconds (default 0), logs "exited cleanly" and exits 0.
"""

import os
import signal
import socket
import sys
import threading
import time

port = int(next(arg.split("=", 1)[1] for arg in sys.argv if arg.startswith("-carla-rpc-port=")))
print(f"fake CARLA server {os.getpid()}: {' '.join(sys.argv[1:])}", flush=True)
mode = os.environ.get("FAKE_CARLA_MODE", "normal")


def log(line: str) -> None:
    """A line of log on stdout, whose reader (the env's log pump) may have died with its process."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        pass


def graceful_exit(*_) -> None:
    log("shutting down")
    time.sleep(float(os.environ.get("FAKE_CARLA_SHUTDOWN_S", "0")))
    log("exited cleanly")
    os._exit(0)


signal.signal(signal.SIGTERM, graceful_exit)
if mode == "exit":
    print("fatal: no Vulkan device found", flush=True)
    sys.exit(3)
if mode == "silent":
    time.sleep(3600)

rpc = socket.create_server(("127.0.0.1", port))
side_ports = [socket.create_server(("127.0.0.1", port + k)) for k in (1, 2)]  # streaming, secondary
frame = 0
lock = threading.Lock()
game_thread_hung = threading.Event()
signal.signal(signal.SIGUSR1, lambda *_: game_thread_hung.set())
GAME_THREAD = {"tick", "settings", "tm"}


def serve(conn: socket.socket) -> None:
    global frame
    with conn, conn.makefile("rb") as lines:
        for line in lines:
            request = line.decode().strip()
            if request in GAME_THREAD and game_thread_hung.is_set():
                time.sleep(3600)
            with lock:
                if request == "tick":
                    frame += 1
                    reply = str(frame)
                else:
                    reply = "0.9.16" if request == "version" else "ok"
            conn.sendall(f"{reply}\n".encode())


def spam() -> None:
    while True:
        print("ERROR: Invalid session: no stream available with id 1234567890", flush=True)
        time.sleep(0.001)


if mode == "spam":
    threading.Thread(target=spam, daemon=True).start()
while True:
    connection, _ = rpc.accept()
    threading.Thread(target=serve, args=(connection,), daemon=True).start()
