"""CARLA server management (carla_env/servers.py, ports.py, client_process.py, supervised.py)
against a stand-in server process.

The stand-in (tests/fake_carla_server.py) runs as the child of a `CarlaUE4.sh` launcher, as the
UE binary does; it binds the RPC, streaming and secondary ports and answers the double's calls
(tests/fake_carla.py, tcp mode); tests kill it (crash), SIGSTOP it (hang) or hang its game
thread. Tests named after a finding of the review (D3, D4, ...) failed on the code it read. The
real `CarlaUE4.sh` was not run here.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from carla_env import procfs
from carla_env.carla_driving import CarlaDrivingEnv
from carla_env.config import ServerSection
from carla_env.ports import PROCESS_SLOTS, check_no_clashes, server_ports, slot_ordinal
from carla_env.server_watchdog import server_members
from carla_env.servers import (
    ExternalServer,
    ManagedServer,
    ServerError,
    ServerRecord,
    accepts_connections,
    claim_external_endpoint,
    game_thread_answers,
    graphics_adapter,
    open_endpoint_pools,
    port_in_use,
)
from tests.fake_carla import FakeCarla

STAND_IN = Path(__file__).with_name("fake_carla_server.py")
DRIVE = np.array([0.0, 1.0], np.float32)
# Long enough that a healthy tick on a loaded 2-core machine never counts as a hang; a hang
# (SIGSTOP) is still found within seconds.
TICK_TIMEOUT_S = 5.0


@pytest.fixture
def carla_root(tmp_path, monkeypatch):
    """A CARLA_ROOT whose CarlaUE4.sh starts the stand-in server as its child, as the real
    script starts the UE binary (no exec: the server is the runner's grandchild). Whatever a
    test leaves running (it failed, or the run was interrupted) is killed when it ends."""
    script = tmp_path / "CarlaUE4.sh"
    script.write_text(f'#!/bin/sh\n"{sys.executable}" "{STAND_IN}" "$@"\n')
    script.chmod(0o755)
    monkeypatch.setenv("CARLA_ROOT", str(tmp_path))
    yield tmp_path
    kill_servers_started_from(script)


def kill_servers_started_from(script: Path) -> list[int]:
    """Kills the process group of every launcher of `script` still running (its stand-in server
    is its child, in its group); returns their pids. A launcher already killed but not yet reaped
    (a zombie, or one still exiting) is not running and is not counted."""
    launchers = [pid for pid in launchers_of(script) if procfs.alive(pid)]
    for pid in launchers:
        try:
            group = os.getpgid(pid)
            if group != os.getpgid(0):  # never this test run's own group
                os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return launchers


def launchers_of(script: Path) -> list[int]:
    return [pid for pid in procfs.pids() if str(script) in procfs.cmdline(pid) and pid != os.getpid()]


def free_base_port(span: int = 64) -> int:
    """A base RPC port in 20000-29999 whose next `span` ports (the stand-in servers bind rpc, +1
    and +2 of each slot) are all free now: chosen at random so that test runs side by side
    rarely collide, and checked, so that a port another program holds is never handed out."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 30000 - span)
        if not any(port_in_use(port) for port in range(base, base + span)):
            return base
    raise AssertionError("no free range of ports in 20000-29999")


def server_binary(rpc_port: int) -> int:
    """The stand-in's pid (the "UE binary"), not its launcher script's."""
    for pid in procfs.pids():
        args = procfs.cmdline(pid)
        if str(STAND_IN) in args and f"-carla-rpc-port={rpc_port}" in args and args[0] != "/bin/sh":
            return pid
    raise AssertionError(f"no stand-in server on port {rpc_port}")


def stand_ins_serving(rpc_port: int) -> list[int]:
    return [pid for pid in procfs.pids()
            if procfs.alive(pid) and str(STAND_IN) in (args := procfs.cmdline(pid)) and f"-carla-rpc-port={rpc_port}" in args]


def wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def server_config(tmp_path, **server) -> ServerSection:
    return ServerSection.model_validate(
        {"base_rpc_port": free_base_port(), "log_dir": str(tmp_path), "startup_timeout_s": 10.0, "gpus": [1], **server}
    )


def managed(tmp_path, **server) -> ManagedServer:
    return ManagedServer(server_config(tmp_path, **server), ordinal=0, carla_module=FakeCarla(tcp=True))


# --- Ports ----------------------------------------------------------------------------------


def test_every_env_slot_of_every_runner_gets_its_own_ports():
    server = ServerSection()
    slots = [slot_ordinal(worker, claim, server) for worker in range(9) for claim in range(4)]
    assert len(set(slots)) == len(slots)
    ports = [p for s in slots for p in server_ports(s, server).all()]
    assert len(set(ports)) == len(ports)
    assert server_ports(slot_ordinal(2, 1, server), server).all() == (2036, 2037, 2038, 8009)
    assert server_ports(slot_ordinal(2, 1, server), server, block=1).all() == (2236, 2237, 2238, 8209)
    check_no_clashes(len(slots), server)


def test_a_traffic_manager_range_inside_the_rpc_range_is_refused_before_anything_starts():
    server = ServerSection(base_rpc_port=2000, base_tm_port=2010)
    with pytest.raises(ValueError, match="port 2010 would serve CARLA slots 0 and 2: move server.base_tm_port"):
        check_no_clashes(8, server)
    with pytest.raises(ValueError, match=r"60 CARLA slots x server.port_stride 4 = 240 ports do not fit in server.run_port_block \(200\)"):
        check_no_clashes(60, ServerSection())


def test_more_envs_in_one_process_than_slots_is_a_clear_error():
    with pytest.raises(ValueError, match="more CARLA envs than server.slots_per_process=2"):
        slot_ordinal(1, 2, ServerSection(slots_per_process=2))


def test_claims_inside_a_process_are_reused_after_release():
    first, second = PROCESS_SLOTS.claim(), PROCESS_SLOTS.claim()
    assert first != second
    PROCESS_SLOTS.release(first)
    assert PROCESS_SLOTS.claim() == first
    PROCESS_SLOTS.release(first)
    PROCESS_SLOTS.release(second)


# --- Launching ------------------------------------------------------------------------------


def test_launches_off_screen_on_its_ports_and_gpu_and_stops_the_whole_process_tree(carla_root, tmp_path):
    server = managed(tmp_path)
    server.start()
    try:
        binary = server_binary(server.ports.rpc)
        assert server.alive() and game_thread_answers(FakeCarla(tcp=True), "127.0.0.1", server.ports.rpc, TICK_TIMEOUT_S) is None
        for port in (server.ports.rpc, server.ports.streaming, server.ports.secondary):
            assert port_in_use(port)
        log = server.log_path.read_text()
        for flag in ("-RenderOffScreen", "-nosound", f"-carla-rpc-port={server.ports.rpc}",
                     f"-carla-streaming-port={server.ports.rpc + 1}", "-graphicsadapter=1"):
            assert flag in log
        assert (tmp_path / f"carla_{server.ports.rpc}.json").is_file()  # for whoever finds it orphaned
    finally:
        server.stop()
    assert not server.alive() and not procfs.alive(binary)
    assert not (tmp_path / f"carla_{server.ports.rpc}.json").exists()


def test_N7_a_graceful_stop_waits_for_the_server_to_exit_on_sigterm(carla_root, tmp_path, monkeypatch):
    """The launcher script dies at SIGTERM at once; UE, in the same group, takes a while."""
    monkeypatch.setenv("FAKE_CARLA_SHUTDOWN_S", "1.0")
    server = managed(tmp_path)
    server.start()
    binary = server_binary(server.rpc_port)
    try:
        server.stop()
        assert "exited cleanly" in server.log_path.read_text() and not procfs.alive(binary)
        server.start()
        binary = server_binary(server.rpc_port)
        server.stop(graceful=False)  # a hung server: killed at once
        assert "exited cleanly" not in server.log_path.read_text().rsplit("fake CARLA server", 1)[1]
    finally:
        server.stop(graceful=False)


def test_missing_carla_root_or_executable_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("CARLA_ROOT", raising=False)
    with pytest.raises(ServerError, match="set CARLA_ROOT or env.kwargs.server.carla_root"):
        managed(tmp_path)
    with pytest.raises(ServerError, match=rf"{tmp_path}/CarlaUE4.sh is not an executable file"):
        managed(tmp_path, carla_root=str(tmp_path))


def test_D20_ports_another_program_holds_move_the_server_up_a_block(carla_root, tmp_path):
    server = managed(tmp_path)
    planned = server_ports(0, server.config)
    with socket.create_server(("127.0.0.1", planned.streaming)):  # another run's server
        server.start()
        try:
            assert server.ports == server_ports(0, server.config, block=1)
        finally:
            server.stop()
        one_block = managed(tmp_path, base_rpc_port=planned.rpc, max_port_blocks=1)
        with pytest.raises(ServerError, match=rf"no free ports for CARLA slot 0 in 1 blocks .*{planned.streaming} in use"):
            one_block.start()


def test_a_server_that_dies_while_starting_reports_its_exit_code_and_log(carla_root, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_CARLA_MODE", "exit")
    with pytest.raises(ServerError, match=r"exited with code 3 while starting; its log ends:\n(.|\n)*no Vulkan device"):
        managed(tmp_path).start()


def test_a_server_that_never_comes_up_times_out_and_is_stopped(carla_root, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_CARLA_MODE", "silent")
    server = managed(tmp_path, startup_timeout_s=1.0)
    with pytest.raises(ServerError, match=r"did not answer within 1 s \(the port never opened\); its log ends"):
        server.start()
    assert not server.alive()


def test_D21_a_server_that_floods_its_log_fills_at_most_two_bounded_files(carla_root, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_CARLA_MODE", "spam")
    server = managed(tmp_path, log_max_mb=0.01)
    server.start()
    try:
        wait_until(lambda: server.log_path.with_name(server.log_path.name + ".1").exists())
        time.sleep(0.5)
    finally:
        server.stop()
    limit = 0.01 * 2**20 + 65536  # a file is started anew before a read would pass the limit
    assert server.log_path.stat().st_size <= limit
    assert server.log_path.with_name(server.log_path.name + ".1").stat().st_size <= limit
    assert sorted(p.name for p in tmp_path.glob("carla_*.log*")) == [server.log_path.name, server.log_path.name + ".1"]


def fake_nvidia_smi(tmp_path, monkeypatch, *names: str) -> None:
    """nvidia-smi listing these GPUs: real nvidia-smi numbers them in PCI bus order."""
    nvidia_smi = tmp_path / "nvidia-smi"
    rows = "".join(f"echo '{i}, GPU-{i}{i}{i}, {name}'\n" for i, name in enumerate(names))
    nvidia_smi.write_text(f"#!/bin/sh\n{rows}")
    nvidia_smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")


def test_D9_the_gpu_ray_gave_the_runner_is_its_vulkan_adapter_in_pci_bus_order(tmp_path, monkeypatch):
    ray_assigned = ServerSection(gpus="ray")
    fake_nvidia_smi(tmp_path, monkeypatch, "NVIDIA L4", "NVIDIA H100 80GB HBM3", "NVIDIA L4")
    # With CUDA_DEVICE_ORDER=PCI_BUS_ID (rl.train's and the cluster's setting), CUDA ordinal k is
    # the k-th GPU on the bus, as nvidia-smi and Vulkan number them; a UUID is found by name.
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    for cuda, vulkan in (("0", 0), ("1", 1), ("2,0", 2), ("GPU-222", 2)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", cuda)
        assert graphics_adapter(ray_assigned, ordinal=5) == vulkan
    # CUDA's default order puts the H100 first: ordinal 0 is bus position 1. Refused, saying how
    # to fix it, rather than a server started on another runner's (or the learner's) GPU.
    monkeypatch.delenv("CUDA_DEVICE_ORDER")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(ServerError, match="CUDA_DEVICE_ORDER=PCI_BUS_ID.*env.kwargs.server.gpus"):
        graphics_adapter(ray_assigned, ordinal=5)
    # Identical GPUs: fastest first is the bus order.
    fake_nvidia_smi(tmp_path, monkeypatch, "NVIDIA L4", "NVIDIA L4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert graphics_adapter(ray_assigned, ordinal=5) == 1
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert graphics_adapter(ray_assigned, ordinal=5) == 0
    assert graphics_adapter(ServerSection(gpus=[0, 1]), ordinal=5) == 1  # explicit: round robin


# --- Supervision: crash, hang, reconnection --------------------------------------------------


def carla_driving_env(tmp_path, render_mode=None, **server) -> CarlaDrivingEnv:
    server = {"base_rpc_port": free_base_port(), "log_dir": str(tmp_path), "startup_timeout_s": 10.0,
              "tick_timeout_s": TICK_TIMEOUT_S, "probe_timeout_s": TICK_TIMEOUT_S, **server}
    return CarlaDrivingEnv(carla_module=FakeCarla(tcp=True), npc_vehicles=3, server=server, render_mode=render_mode)


FAILURES = {"crash": signal.SIGKILL, "hang": signal.SIGSTOP, "game_thread_hang": signal.SIGUSR1}


@pytest.mark.parametrize("failure", FAILURES)
def test_D3_a_crashed_or_hung_server_is_replaced_with_a_new_client_and_training_goes_on(carla_root, tmp_path, failure):
    """In one process, the client's Traffic Manager would abort it at the first tick after the
    restart (as real CARLA does, and the double): the client lives in a child process."""
    env = carla_driving_env(tmp_path)
    try:
        env.reset(seed=0)
        env.step(DRIVE)
        binary, client_pid = server_binary(env.simulator.server.ports.rpc), env.simulator.client._process.pid
        os.kill(binary, FAILURES[failure])
        wait_until(lambda: procfs.state(binary) in ("Z", "T", None, "S"))

        start = time.monotonic()
        _, reward, terminated, truncated, info = env.step(DRIVE)
        assert (reward, terminated, truncated, info["episode_end"]) == (0.0, False, True, "backend_failure")
        # N3: found by the tick's own timeout (then a restart and a new client), not by the
        # client process's backstop ((4 + 2) x 5 + 5 = 35 s)
        assert time.monotonic() - start < TICK_TIMEOUT_S + 15
        health = env.backend_health()
        assert health["server_restarts"] == 1 and health["tick_timeouts"] == 1
        assert not procfs.alive(binary)  # a hung server is killed, not left behind
        assert not procfs.alive(client_pid) and env.simulator.client._process.pid != client_pid

        env.reset(seed=1)  # the new client on the new server: episodes go on
        for _ in range(3):
            assert env.step(DRIVE)[4]["episode_end"] is None
    finally:
        env.close()
    assert not env.simulator.server.alive()


def test_the_chase_view_comes_through_the_client_process_and_a_lost_server_costs_it_no_error(carla_root, tmp_path):
    from carla_env.carla_sim import VIEW_SIZE

    env = carla_driving_env(tmp_path, render_mode="rgb_array")
    try:
        env.reset(seed=0)
        env.step(DRIVE)
        assert env.render().shape == (VIEW_SIZE[1], VIEW_SIZE[0], 3)
        os.kill(server_binary(env.simulator.server.ports.rpc), signal.SIGKILL)
        assert env.step(DRIVE)[4]["episode_end"] == "backend_failure"
        env.simulator.client.kill()  # the new client's process gone too: no view, and no error
        assert env.render() is None
        env.reset(seed=1)  # recovered: a new client, with its chase camera
        assert env.render().shape == (VIEW_SIZE[1], VIEW_SIZE[0], 3)
    finally:
        env.close()


def test_a_server_a_test_leaves_running_is_killed_when_the_test_ends(carla_root, tmp_path):
    server = managed(tmp_path)
    server.start()  # and never stopped, as by a test that fails halfway
    binary = server_binary(server.rpc_port)
    launchers = kill_servers_started_from(carla_root / "CarlaUE4.sh")
    assert launchers
    # SIGKILL is delivered, not awaited: wait for the whole group to be gone before sweeping again
    wait_until(lambda: not any(procfs.alive(pid) for pid in [binary, *launchers]))
    assert not kill_servers_started_from(carla_root / "CarlaUE4.sh")


def test_D3_the_double_aborts_a_process_that_reconnects_in_process_as_real_carla_does(carla_root, tmp_path):
    """Fidelity of the double on the point that decided the design: reconnecting in the same
    process after a server restart gets the stale Traffic Manager back, and it aborts."""
    config = server_config(tmp_path)
    script = f"""
import os, signal
from carla_env.carla_sim import CarlaSimulator
from carla_env.config import CarlaEnvConfig
from carla_env.servers import ManagedServer
from tests.fake_carla import FakeCarla
from tests.test_carla_servers import server_binary
config = CarlaEnvConfig.model_validate({{"npc_vehicles": 2, "server": {config.model_dump()!r}}})
carla, server = FakeCarla(tcp=True), ManagedServer(config.server, 0, FakeCarla(tcp=True))
server.start()
try:
    sim = CarlaSimulator(config, server.host, server.rpc_port, server.tm_port, carla)
    sim.reset(0)
    os.kill(server_binary(server.rpc_port), signal.SIGKILL)
    server.recover()
    again = CarlaSimulator(config, server.host, server.rpc_port, server.tm_port, carla)
    again.reset(None)  # its first tick ticks the stale Traffic Manager too
    print("survived", flush=True)
finally:
    server.stop()
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == -signal.SIGABRT, run.stdout + run.stderr
    assert "traffic manager on port" in run.stderr and "survived" not in run.stdout
    # The abort skipped the script's `finally`: its server is an orphan, stopped by its watchdog
    # (N6) or, should this test read its record first, by the record (D8). Which one is a race
    # (it failed CI once asserting the record): the D8 and N6 tests each pin one path down.
    for record in tmp_path.glob("carla_*.json"):
        ServerRecord(tmp_path, int(record.stem.split("_")[1])).kill_if_stale()
    rpc_port = server_ports(0, config).rpc
    wait_until(lambda: not stand_ins_serving(rpc_port), timeout_s=30.0)


def test_D8_a_server_left_by_a_runner_that_died_is_killed_before_its_ports_are_reused(carla_root, tmp_path):
    config = server_config(tmp_path)
    runner = f"""
import os, signal
from carla_env.config import ServerSection
from carla_env.servers import ManagedServer
from tests.fake_carla import FakeCarla
server = ManagedServer(ServerSection.model_validate({config.model_dump()!r}), 0, FakeCarla(tcp=True))
server.start()
os.kill(server._watchdog[0], signal.SIGKILL)  # the server's watchdog (N6) gone too, as by `pkill -9 python`
os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit: as an OOM kill or a C++ abort
"""
    subprocess.run([sys.executable, "-c", runner], timeout=60, cwd=Path(__file__).resolve().parents[1])
    rpc = server_ports(0, config).rpc
    orphan = server_binary(rpc)
    assert procfs.alive(orphan) and port_in_use(rpc)  # nothing killed it

    replacement = ManagedServer(config, 0, FakeCarla(tcp=True))  # same worker index, same ports
    replacement.start()
    try:
        assert not procfs.alive(orphan) and replacement.ports.rpc == rpc
        assert server_binary(rpc) != orphan
    finally:
        replacement.stop()


def test_N6_a_server_whose_runner_died_is_stopped_on_its_node_though_no_runner_comes_back_there(
        carla_root, tmp_path, monkeypatch):
    """Ray may restart the runner on another node, where this node's record is never read: the
    server's watchdog stops it, gracefully, with no new server claiming its ports."""
    monkeypatch.setenv("FAKE_CARLA_SHUTDOWN_S", "0.5")
    config = server_config(tmp_path, owner_check_s=0.2)
    runner = f"""
import os, signal
from carla_env.config import ServerSection
from carla_env.servers import ManagedServer
from tests.fake_carla import FakeCarla
server = ManagedServer(ServerSection.model_validate({config.model_dump()!r}), 0, FakeCarla(tcp=True))
server.start()
from tests.test_carla_servers import server_binary
print(server._watchdog[0], server_binary(server.rpc_port), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit: as an OOM kill or a C++ abort
"""
    out = subprocess.run([sys.executable, "-c", runner], timeout=60, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    watchdog, orphan = (int(pid) for pid in out.split())
    rpc = server_ports(0, config).rpc
    wait_until(lambda: not procfs.alive(watchdog), timeout_s=0.2 + 0.5 + 10.0)  # it is gone with its server
    assert not procfs.alive(orphan) and not port_in_use(rpc) and not ServerRecord(tmp_path, rpc).path.exists()
    said = (tmp_path / f"watchdog_{rpc}.log").read_text()
    assert "is gone: stopping the server on port" in said
    assert "exited on SIGTERM" in said  # gracefully, as stop() does


def test_a_live_runners_server_is_left_alone_by_its_watchdog_and_stop_leaves_no_watchdog(carla_root, tmp_path):
    server = managed(tmp_path, owner_check_s=0.05)
    server.start()
    watchdog, _ = server._watchdog
    try:
        assert procfs.children(os.getpid()).count(watchdog) == 0  # detached: Ray kills a worker's children
        said = tmp_path / f"watchdog_{server.rpc_port}.log"
        wait_until(lambda: "watching the server on port" in said.read_text(), timeout_s=30.0)
        time.sleep(0.5)  # ten checks
        assert server.alive() and procfs.alive(server_binary(server.rpc_port)) and procfs.alive(watchdog)
    finally:
        server.stop()
    assert not procfs.alive(watchdog) and "is gone" not in said.read_text()
    server.start()  # a restart gets a new watchdog
    try:
        assert server._watchdog[0] != watchdog and procfs.alive(server._watchdog[0])
    finally:
        server.stop()


def test_a_watchdog_leaves_the_record_of_a_newer_server_on_its_ports(carla_root, tmp_path):
    """Its server killed meanwhile by a new runner (D8), which wrote its own record: that one stays."""
    from carla_env.server_watchdog import watch

    server = managed(tmp_path)
    server.start()
    try:
        server._stop_watchdog()
        record = ServerRecord(tmp_path, server.rpc_port)
        record.path.write_text(json.dumps({"pgid": server.process.pid + 100000}))  # a newer server's
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        owner = int(dead.stdout)
        assert watch(owner, 0, server.process.pid, server.rpc_port, record.path, 0.05, 1.0) == "orphan stopped"
        assert record.path.exists() and not server_members(server.process.pid, server.rpc_port)
    finally:
        server.stop(graceful=False)


def test_a_server_whose_watchdog_cannot_start_is_stopped_with_a_clear_error(carla_root, tmp_path, monkeypatch):
    server = managed(tmp_path)
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(ServerError, match=r"the watchdog of the CARLA server on port \d+ did not start"):
        server.start()
    assert not kill_servers_started_from(carla_root / "CarlaUE4.sh")  # nothing left running
    assert not ServerRecord(tmp_path, server.rpc_port).path.exists()


def test_a_server_of_another_live_run_is_left_alone(carla_root, tmp_path):
    config = server_config(tmp_path)
    other_run = subprocess.Popen(
        [sys.executable, "-c", f"""
import time
from carla_env.config import ServerSection
from carla_env.servers import ManagedServer
from tests.fake_carla import FakeCarla
server = ManagedServer(ServerSection.model_validate({config.model_dump()!r}), 0, FakeCarla(tcp=True))
server.start()
print("up", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1], start_new_session=True)
    try:
        assert other_run.stdout.readline().strip() == "up"
        theirs = server_binary(server_ports(0, config).rpc)
        ours = ManagedServer(config, 0, FakeCarla(tcp=True))
        ours.start()
        try:
            assert ours.ports == server_ports(0, config, block=1) and procfs.alive(theirs)
        finally:
            ours.stop()
    finally:
        os.killpg(other_run.pid, signal.SIGKILL)
        other_run.wait()
        os.killpg(os.getpgid(theirs), signal.SIGKILL) if procfs.alive(theirs) else None


def test_restarts_stop_at_max_restarts_with_an_error(carla_root, tmp_path):
    env = carla_driving_env(tmp_path, max_restarts=0)
    try:
        env.reset(seed=0)
        os.kill(server_binary(env.simulator.server.ports.rpc), signal.SIGKILL)
        with pytest.raises(ServerError, match=r"failed again after 0 restarts \(server.max_restarts\)(.|\n)*the failure that needed a restart: time-out"):
            env.step(DRIVE)
    finally:
        env.close()


def test_in_a_ray_job_the_drivers_pool_shares_external_servers_out_across_processes(ray_local):
    """The production path: env runners are separate processes; the pool is a named actor
    the driver made (rl/train.py), so it outlives the runner that claimed first."""
    ray = ray_local
    server = ServerSection(mode="external", external=["10.0.0.1:2000", "10.0.0.2:2000"])
    pools = open_endpoint_pools(server)

    @ray.remote(num_cpus=0)
    class Runner:
        def claim(self, server):
            return claim_external_endpoint(server)[0]

    first_runner, second_runner = Runner.remote(), Runner.remote()
    try:
        first = ray.get(first_runner.claim.remote(server))
        second = ray.get(second_runner.claim.remote(server))
        assert {first, second} == set(server.external)
        with pytest.raises(ray.exceptions.RayTaskError, match="all 2 external CARLA servers"):
            ray.get(second_runner.claim.remote(server))  # both holders live: none is taken back
        # Another list of servers in the same job is another pool.
        other = ServerSection(mode="external", external=["10.0.0.3:2000"])
        pools += open_endpoint_pools(other)
        assert ray.get(second_runner.claim.remote(other)) == "10.0.0.3:2000"
    finally:
        for actor in (*pools, first_runner, second_runner):
            ray.kill(actor)


class EnvRunnerStandIn:
    """An env runner's process in a Ray job: makes a CARLA env, drives, and holds it."""

    def drive(self, server: dict) -> tuple[int, int]:
        self.env = CarlaDrivingEnv(carla_module=FakeCarla(tcp=True), npc_vehicles=2, server=server)
        self.env.reset(seed=0)
        assert self.env.step(DRIVE)[4]["episode_end"] is None
        return self.env.simulator.server.rpc_port, os.getpid()

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        self.env.close()


def test_N1_a_runner_ray_restarts_on_its_node_gets_the_nodes_external_server_back(ray_local, carla_root, tmp_path):
    """external_scope node: one sidecar server per pod. A runner that dies without close() (an
    OOM kill), restarted by Ray on the pod (RLlib's runners are actors with max_restarts): the
    pool sees that the holder's process is dead and gives its server to the new process."""
    ray = ray_local
    stand_in = managed(tmp_path)
    stand_in.start()
    server = {"mode": "external", "external": [f"127.0.0.1:{stand_in.rpc_port}"], "external_scope": "node",
              "tick_timeout_s": TICK_TIMEOUT_S, "probe_timeout_s": TICK_TIMEOUT_S, "startup_timeout_s": 10.0,
              "base_tm_port": free_base_port() + 5000}
    pools = open_endpoint_pools(ServerSection.model_validate(server))
    runner = ray.remote(num_cpus=0, max_restarts=1)(EnvRunnerStandIn).remote()
    try:
        port, pid = ray.get(runner.drive.remote(server))
        assert port == stand_in.rpc_port
        ray.kill(runner, no_restart=False)  # SIGKILL: no close(), its endpoint never released

        def restarted() -> bool:
            try:
                return ray.get(runner.pid.remote()) != pid
            except ray.exceptions.ActorUnavailableError:  # while Ray restarts it
                return False

        wait_until(restarted, timeout_s=60)
        port, new_pid = ray.get(runner.drive.remote(server))
        assert port == stand_in.rpc_port and new_pid != pid
        ray.get(runner.close.remote())
    finally:
        for actor in (*pools, runner):
            ray.kill(actor)
        stand_in.stop()


def test_external_servers_are_shared_out_one_per_env_and_reconnected_after_a_failure(carla_root, tmp_path):
    stand_ins = [managed(tmp_path / str(i)) for i in range(2)]
    for s in stand_ins:
        s.start()
    endpoints = [f"127.0.0.1:{s.ports.rpc}" for s in stand_ins]
    try:
        server = {"mode": "external", "external": endpoints, "tick_timeout_s": TICK_TIMEOUT_S, "startup_timeout_s": 10.0,
                  "probe_timeout_s": TICK_TIMEOUT_S, "base_tm_port": free_base_port() + 5000}
        first = CarlaDrivingEnv(carla_module=FakeCarla(tcp=True), npc_vehicles=2, server=server)
        second = CarlaDrivingEnv(carla_module=FakeCarla(tcp=True), npc_vehicles=2, server=server)
        assert {first.simulator.server.rpc_port, second.simulator.server.rpc_port} == {
            s.ports.rpc for s in stand_ins
        }
        with pytest.raises(ServerError, match="all 2 external CARLA servers .* are taken"):
            claim_external_endpoint(ServerSection.model_validate(server))

        # The server behind `first` crashes; someone (Kubernetes) brings it back on its port.
        first.reset(seed=0)
        behind = next(s for s in stand_ins if s.ports.rpc == first.simulator.server.rpc_port)
        os.kill(server_binary(behind.ports.rpc), signal.SIGKILL)
        behind.stop()
        behind.start()
        _, _, _, truncated, info = first.step(DRIVE)
        assert truncated and info["episode_end"] == "backend_failure"
        first.reset(seed=1)
        assert first.step(DRIVE)[4]["episode_end"] is None
        assert first.backend_health()["server_restarts"] == 1

        first.close()  # its endpoint is free again
        third = CarlaDrivingEnv(carla_module=FakeCarla(tcp=True), npc_vehicles=2, server=server)
        third.close()
        second.close()
    finally:
        for s in stand_ins:
            s.stop()


def test_N10_restart_every_episodes_leaves_an_external_servers_client_alone(carla_root, tmp_path):
    """Only a managed server is restarted; an external one's client lives on between episodes."""
    stand_in = managed(tmp_path)
    stand_in.start()
    server = {"mode": "external", "external": [f"127.0.0.1:{stand_in.rpc_port}"], "restart_every_episodes": 1,
              "tick_timeout_s": TICK_TIMEOUT_S, "probe_timeout_s": TICK_TIMEOUT_S, "startup_timeout_s": 10.0,
              "base_tm_port": free_base_port() + 5000}
    env = CarlaDrivingEnv(carla_module=FakeCarla(tcp=True), npc_vehicles=2, server=server)
    try:
        env.reset(seed=0)
        client = env.simulator.client._process.pid
        for seed in (1, 2):
            env.reset(seed=seed)
            assert env.step(DRIVE)[4]["episode_end"] is None
        assert env.simulator.client._process.pid == client  # one client: nothing left behind
        assert env.backend_health()["server_restarts"] == 0
    finally:
        env.close()
        stand_in.stop()


def test_D4_an_external_server_whose_game_thread_hangs_is_not_taken_for_alive(carla_root, tmp_path):
    stand_in = managed(tmp_path)
    stand_in.start()
    try:
        os.kill(server_binary(stand_in.ports.rpc), signal.SIGUSR1)  # the game thread hangs
        assert accepts_connections("127.0.0.1", stand_in.ports.rpc)  # TCP still says yes
        config = ServerSection(mode="external", external=[f"127.0.0.1:{stand_in.ports.rpc}"],
                               startup_timeout_s=1.0, probe_timeout_s=0.5)
        external = ExternalServer(config, config.external[0], 0, FakeCarla(tcp=True))
        with pytest.raises(ServerError, match=r"external CARLA server 127.0.0.1:\d+ did not answer within 1 s \(time-out"):
            external.recover()
    finally:
        stand_in.stop()


def test_an_external_server_that_does_not_answer_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        server = ServerSection(mode="external", external=[f"127.0.0.1:{port}"], startup_timeout_s=0.5)
        with pytest.raises(ServerError, match=rf"external CARLA server 127.0.0.1:{port} did not answer within 0.5 s"):
            ExternalServer(server, server.external[0], 0, FakeCarla(tcp=True)).start()


# --- From the experiment config -------------------------------------------------------------


def test_the_carla_experiment_config_loads_and_its_env_learns_its_runners_worker_index(monkeypatch):
    from ray.rllib.env.env_context import EnvContext

    from rl.config import load_config
    from rl.experiment import _make_carla_env, env_descriptor

    exp = load_config(Path(__file__).resolve().parents[1] / "configs" / "driving_carla_td3.yaml")
    assert env_descriptor(exp) == "carla_env/CarlaDriving"
    made = {}
    monkeypatch.setattr("carla_env.carla_driving.CarlaDrivingEnv", lambda **kw: made.update(kw))
    _make_carla_env(EnvContext({"town": "Town01"}, worker_index=3))
    assert made == {"worker_index": 3, "town": "Town01"}


def test_clashing_ports_or_too_few_slots_fail_at_config_load():
    from rl.config import ConfigError, parse_config

    def experiment(server: dict, envs_per_runner: int = 1) -> dict:
        return {
            "experiment": {"name": "x", "stop_env_steps": 10},
            "env": {"id": "carla_env:CarlaDriving-v0", "kwargs": {"server": server}},
            "resources": {"num_env_runners": 4, "num_envs_per_env_runner": envs_per_runner},
        }

    with pytest.raises(ConfigError, match=r"env.kwargs.server: port 2008 would serve CARLA slots 0 and 2"):
        parse_config(experiment({"base_tm_port": 2008}), "carla.yaml")
    with pytest.raises(ConfigError, match=r"slots_per_process \(2\) must be at least resources.num_envs_per_env_runner \+ 1"):
        parse_config(experiment({"slots_per_process": 2}, envs_per_runner=2), "carla.yaml")
    unknown_town = experiment({})
    unknown_town["env"]["kwargs"]["town"] = "Town99"
    with pytest.raises(ConfigError, match=r"env.kwargs.town: Value error, unknown town 'Town99'; CARLA 0.9.16 maps: Town01"):
        parse_config(unknown_town, "carla.yaml")


# --- The liveness probe (Kubernetes) -----------------------------------------------------------


def probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "carla_env.probe", "--carla-module", "tests.fake_carla:tcp_carla", *args],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])


def test_D4_the_liveness_probe_asks_the_game_thread_and_serves_kubernetes_over_http(carla_root, tmp_path):
    import urllib.error
    import urllib.request

    stand_in = managed(tmp_path)
    stand_in.start()
    http_port = free_base_port() + 7
    server = f"127.0.0.1:{stand_in.ports.rpc}"
    prober = subprocess.Popen(
        [sys.executable, "-m", "carla_env.probe", "--carla-module", "tests.fake_carla:tcp_carla", "--server", server,
         "--timeout", "1", "--serve", str(http_port)], cwd=Path(__file__).resolve().parents[1])

    def healthz() -> int:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=30).status
        except urllib.error.HTTPError as e:
            return e.code

    try:
        assert probe("--server", server).returncode == 0
        wait_until(lambda: accepts_connections("127.0.0.1", http_port), timeout_s=20)
        assert healthz() == 200
        os.kill(server_binary(stand_in.ports.rpc), signal.SIGUSR1)  # the game thread hangs
        hung = probe("--server", server, "--timeout", "1")
        assert hung.returncode == 1 and "not answering: time-out" in hung.stdout
        assert healthz() == 503  # the kubelet restarts the CARLA container
    finally:
        prober.kill()
        prober.wait()
        stand_in.stop()


def client_processes() -> list[int]:
    """This test process's CARLA client children."""
    return [pid for pid in procfs.children(os.getpid()) if "carla_env.client_process" in procfs.cmdline(pid)]


def test_a_clear_error_while_connecting_leaves_no_server_and_no_client_process_behind(carla_root, tmp_path):
    with pytest.raises(ServerError, match="town 'Town05' is not on the server"):
        CarlaDrivingEnv(carla_module=FakeCarla(tcp=True), town="Town05", server={
            "base_rpc_port": free_base_port(), "log_dir": str(tmp_path), "startup_timeout_s": 10.0}).reset(seed=0)
    assert [p for p in client_processes() if procfs.alive(p)] == []
    assert list(tmp_path.glob("carla_*.json")) == []  # the server was stopped: its record is gone
