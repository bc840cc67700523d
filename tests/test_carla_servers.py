"""CARLA server management (carla_env/servers.py, ports.py) against a stand-in server process.

The stand-in (tests/fake_carla_server.py) is launched exactly as `CarlaUE4.sh` would be, listens
on the RPC port and answers ticks; tests kill it (crash) or SIGSTOP it (hang). The real
`CarlaUE4.sh` was not run here.
"""

import os
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from carla_env.carla_driving import CarlaDrivingEnv
from carla_env.config import ServerSection
from carla_env.ports import PROCESS_SLOTS, check_no_clashes, server_ports, slot_ordinal
from carla_env.servers import ExternalServer, ManagedServer, ServerError, answers, claim_external_endpoint
from tests.fake_carla import FakeCarla

STAND_IN = Path(__file__).with_name("fake_carla_server.py")
DRIVE = np.array([0.0, 1.0], np.float32)


@pytest.fixture
def carla_root(tmp_path, monkeypatch):
    """A CARLA_ROOT whose CarlaUE4.sh starts the stand-in server."""
    script = tmp_path / "CarlaUE4.sh"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STAND_IN}" "$@"\n')
    script.chmod(0o755)
    monkeypatch.setenv("CARLA_ROOT", str(tmp_path))
    return tmp_path


def free_base_port() -> int:
    """A base port with a few free ports above it (ports of this test run only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return 20000 + s.getsockname()[1] % 20000


def process_state(pid: int) -> str | None:
    """R, S, T (stopped), Z (dead, not reaped); None once gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return None
    return next(line.split()[1] for line in status.splitlines() if line.startswith("State:"))


def wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def managed(tmp_path, **server) -> ManagedServer:
    config = ServerSection.model_validate({"startup_timeout_s": 10.0, **server})
    ports = server_ports(0, config.model_copy(update={"base_rpc_port": free_base_port()}))
    return ManagedServer(config, ports, gpu=1, log_path=tmp_path / "server.log")


# --- Ports ----------------------------------------------------------------------------------


def test_every_env_slot_of_every_runner_gets_its_own_ports():
    server = ServerSection()
    slots = [slot_ordinal(worker, claim, server) for worker in range(9) for claim in range(4)]
    assert len(set(slots)) == len(slots)
    ports = [p for s in slots for p in server_ports(s, server).all()]
    assert len(set(ports)) == len(ports)
    assert server_ports(slot_ordinal(2, 1, server), server).all() == (2036, 2037, 2038, 8009)
    check_no_clashes(len(slots), server)


def test_a_traffic_manager_range_inside_the_rpc_range_is_refused_before_anything_starts():
    server = ServerSection(base_rpc_port=2000, base_tm_port=2010)
    with pytest.raises(ValueError, match="port 2010 would serve CARLA slots 0 and 2: move server.base_tm_port"):
        check_no_clashes(8, server)


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


def test_launches_off_screen_on_its_ports_and_gpu_and_waits_until_it_answers(carla_root, tmp_path):
    server = managed(tmp_path)
    server.start()
    try:
        assert server.alive() and answers("127.0.0.1", server.ports.rpc)
        log = (tmp_path / "server.log").read_text()
        for flag in ("-RenderOffScreen", "-nosound", f"-carla-rpc-port={server.ports.rpc}",
                     f"-carla-streaming-port={server.ports.rpc + 1}", "-graphicsadapter=1"):
            assert flag in log
    finally:
        server.stop()
    assert not server.alive()


def test_missing_carla_root_or_executable_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("CARLA_ROOT", raising=False)
    with pytest.raises(ServerError, match="set CARLA_ROOT or env.kwargs.server.carla_root"):
        managed(tmp_path)
    with pytest.raises(ServerError, match=rf"{tmp_path}/CarlaUE4.sh is not an executable file"):
        managed(tmp_path, carla_root=str(tmp_path))


def test_a_port_already_in_use_is_a_clear_error(carla_root, tmp_path):
    server = managed(tmp_path)
    with socket.create_server(("127.0.0.1", server.ports.streaming)):
        with pytest.raises(ServerError, match=rf"port {server.ports.streaming} is already in use"):
            server.start()


def test_a_server_that_dies_while_starting_reports_its_exit_code_and_log(carla_root, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_CARLA_MODE", "exit")
    with pytest.raises(ServerError, match=r"exited with code 3 while starting; its log ends:\n(.|\n)*no Vulkan device"):
        managed(tmp_path).start()


def test_a_server_that_never_comes_up_times_out_and_is_stopped(carla_root, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_CARLA_MODE", "silent")
    server = managed(tmp_path, startup_timeout_s=1.0)
    with pytest.raises(ServerError, match=r"did not answer within 1 s"):
        server.start()
    assert not server.alive()


# --- Supervision: crash, hang, reconnection --------------------------------------------------


def carla_driving_env(tmp_path, **server) -> CarlaDrivingEnv:
    server = {"base_rpc_port": free_base_port(), "startup_timeout_s": 10.0, "tick_timeout_s": 1.0, **server}
    return CarlaDrivingEnv(carla_module=FakeCarla(tcp=True), npc_vehicles=3, server=server)


@pytest.mark.parametrize("failure", ["crash", "hang"])
def test_a_crashed_or_hung_server_is_restarted_and_training_goes_on(carla_root, tmp_path, failure):
    env = carla_driving_env(tmp_path)
    try:
        env.reset(seed=0)
        env.step(DRIVE)
        old_process = env.simulator.server.process
        os.kill(old_process.pid, signal.SIGKILL if failure == "crash" else signal.SIGSTOP)
        wait_until(lambda: process_state(old_process.pid) in ("Z", "T", None))

        _, reward, terminated, truncated, info = env.step(DRIVE)
        assert (reward, terminated, truncated, info["episode_end"]) == (0.0, False, True, "backend_failure")
        health = env.backend_health()
        assert health["server_restarts"] == 1 and health["tick_timeouts"] == 1
        assert env.simulator.server.process.pid != old_process.pid
        assert old_process.poll() is not None  # the hung one was killed, not left behind

        env.reset(seed=1)  # reconnected to the new server: episodes go on
        for _ in range(3):
            assert env.step(DRIVE)[4]["episode_end"] is None
    finally:
        env.close()
    assert not env.simulator.server.alive()


def test_restarts_stop_at_max_restarts_with_an_error(carla_root, tmp_path):
    env = carla_driving_env(tmp_path, max_restarts=0)
    try:
        env.reset(seed=0)
        os.kill(env.simulator.server.process.pid, signal.SIGKILL)
        with pytest.raises(ServerError, match=r"failed again after 0 restarts \(server.max_restarts\)"):
            env.step(DRIVE)
    finally:
        env.close()


def test_external_servers_are_shared_out_one_per_env_and_reconnected_after_a_failure(carla_root, tmp_path):
    stand_ins = [managed(tmp_path / str(i)) for i in range(2)]
    for s in stand_ins:
        s.start()
    endpoints = [f"127.0.0.1:{s.ports.rpc}" for s in stand_ins]
    try:
        server = {"mode": "external", "external": endpoints, "tick_timeout_s": 1.0, "startup_timeout_s": 10.0}
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
        os.kill(behind.process.pid, signal.SIGKILL)
        behind.process.wait()
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


def test_an_external_server_that_does_not_answer_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        server = ServerSection(mode="external", external=[f"127.0.0.1:{port}"], startup_timeout_s=0.5)
        with pytest.raises(ServerError, match=rf"external CARLA server 127.0.0.1:{port} did not answer within 0.5 s"):
            ExternalServer(server, server.external[0]).start()


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
