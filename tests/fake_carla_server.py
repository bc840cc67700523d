"""Stand-in for `CarlaUE4.sh` in tests: a process that listens on `-carla-rpc-port` like a server.

Each line a client sends is a tick; the reply is the next frame number. The test double client
(tests/fake_carla.py) ticks through it, so a killed stand-in refuses connections and a stopped
one (SIGSTOP) times out, like a crashed or hung CARLA server.

FAKE_CARLA_MODE: "normal"; "exit" (logs a fatal line and exits 3 while starting);
"silent" (runs but never listens: a server that never comes up).
"""

import os
import socket
import sys
import threading
import time

port = int(next(arg.split("=", 1)[1] for arg in sys.argv if arg.startswith("-carla-rpc-port=")))
print(f"fake CARLA server: {' '.join(sys.argv[1:])}", flush=True)
mode = os.environ.get("FAKE_CARLA_MODE", "normal")
if mode == "exit":
    print("fatal: no Vulkan device found", flush=True)
    sys.exit(3)
if mode == "silent":
    time.sleep(3600)

server = socket.create_server(("127.0.0.1", port))
frame = 0
lock = threading.Lock()


def serve(conn: socket.socket) -> None:
    global frame
    with conn, conn.makefile("rb") as lines:
        for _ in lines:
            with lock:
                frame += 1
                reply = f"{frame}\n".encode()
            conn.sendall(reply)


while True:
    connection, _ = server.accept()
    threading.Thread(target=serve, args=(connection,), daemon=True).start()
