"""carla_env/probe.py: its arguments refused with one line and exit 2 (bug report F8), and
concurrent HTTP requests sharing one check process, not one each (F9), against a stand-in
carla module whose game thread answers after SLOW_S (no CARLA server)."""

import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from carla_env import procfs
from carla_env.probe import SharedCheck, main

ROOT = Path(__file__).resolve().parents[1]
SLOW_S = 1.0
STAND_IN = "tests.test_probe_input:slow_carla"


def slow_carla():
    """A `carla` module whose server answers `get_settings` after SLOW_S."""
    class Client:
        def __init__(self, host, port, worker_threads=0):
            pass

        def set_timeout(self, seconds):
            pass

        def get_world(self):
            return self

        def get_settings(self):
            time.sleep(SLOW_S)

    return SimpleNamespace(Client=Client)


BAD_ARGUMENTS = {
    "server without port": (["--server", "localhost"], "argument --server: expected HOST:PORT"),
    "server port not a number": (["--server", "h:abc"], "argument --server: expected HOST:PORT"),
    "server port out of range": (["--server", "127.0.0.1:99999"], "argument --server: expected HOST:PORT"),
    "serve port out of range": (["--server", "127.0.0.1:2000", "--serve", "99999"],
                                "argument --serve: expected a port number from 1 to 65535, got '99999'"),
    "carla module not importable": (["--server", "127.0.0.1:2000", "--carla-module", "no_such_module:factory"],
                                    "argument --carla-module: cannot load 'no_such_module:factory': ModuleNotFoundError"),
    "carla factory missing": (["--server", "127.0.0.1:2000", "--carla-module", "tests.fake_carla:no_such"],
                              "argument --carla-module: cannot load 'tests.fake_carla:no_such': AttributeError"),
    "negative timeout": (["--server", "127.0.0.1:2000", "--timeout", "-1"], "argument --timeout: expected seconds"),
    "timeout not a number": (["--server", "127.0.0.1:2000", "--timeout", "nan"], "argument --timeout: expected seconds"),
}


@pytest.mark.parametrize("arguments, expected", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_F8_an_invalid_argument_is_refused_with_one_line_and_exit_2(capsys, arguments, expected):
    if "--carla-module" not in arguments:
        arguments = [*arguments, "--carla-module", STAND_IN]  # never the real client, never a server
    with pytest.raises(SystemExit) as exit_:
        main(arguments)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("python -m carla_env.probe: error: " + expected), err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def healthz(port: int) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=60) as answer:
        return answer.status, answer.read().decode()


def test_F9_thirty_concurrent_requests_share_one_check_process():
    port = free_port()
    prober = subprocess.Popen(
        [sys.executable, "-m", "carla_env.probe", "--carla-module", STAND_IN, "--server", "127.0.0.1:2000",
         "--timeout", "5", "--serve", str(port)], cwd=ROOT)
    most, done = 0, threading.Event()

    def count_children():
        nonlocal most
        while not done.is_set():
            most = max(most, len(procfs.children(prober.pid)))
            time.sleep(0.005)

    try:
        deadline = time.monotonic() + 30
        while not serving(port):
            assert prober.poll() is None and time.monotonic() < deadline, "the probe never served"
            time.sleep(0.1)
        counter = threading.Thread(target=count_children)
        counter.start()
        with ThreadPoolExecutor(30) as pool:
            answers = list(pool.map(lambda _: healthz(port), range(30)))
        done.set()
        counter.join()
    finally:
        done.set()
        prober.kill()
        prober.wait()
    assert answers == [(200, "alive: 127.0.0.1:2000: alive\n")] * 30
    assert most == 1  # one check process at a time (it was one per request: 30)


def test_a_shared_result_is_reused_only_while_fresh():
    calls = []
    shared = SharedCheck(lambda: calls.append(None) or len(calls), fresh_s=0.2)
    assert shared() == 1 and shared() == 1  # within fresh_s: the same check's result
    time.sleep(0.25)
    assert shared() == 2  # a hang that began since is still seen
