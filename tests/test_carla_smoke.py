"""`python -m carla_env.smoke`, the real-server smoke test, run against the test double and the
stand-in server (no real CARLA server runs here): every scenario runs, a backend that aborts is
reported as a FAIL with its signal, and the table and smoke.json say what was measured."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from carla_env.config import ServerSection
from carla_env.servers import ManagedServer
from tests.fake_carla import FakeCarla
from tests.test_carla_servers import TICK_TIMEOUT_S, carla_root, free_base_port  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]


def aborting_carla() -> FakeCarla:
    """A client that aborts its process at the first tick, as a stale Traffic Manager does."""
    fake = FakeCarla(tcp=True)
    fake._tick_traffic_managers = os.abort
    return fake


def smoke(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    base = free_base_port()
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump({"env": {"id": "carla_env:CarlaDriving-v0", "kwargs": {
        "town": "Town03", "npc_vehicles": 5,
        "server": {"base_rpc_port": base, "base_tm_port": base + 10000, "log_dir": str(tmp_path / "logs"),
                   "startup_timeout_s": 10.0, "tick_timeout_s": TICK_TIMEOUT_S, "probe_timeout_s": TICK_TIMEOUT_S, "connect_timeout_s": 10.0},
    }}}))
    run = subprocess.run(
        [sys.executable, "-m", "carla_env.smoke", "--config", str(config), "--resets", "5", "--out",
         str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    report = tmp_path / "out" / "smoke.json"
    return run, json.loads(report.read_text()) if report.is_file() else {}


def test_every_scenario_passes_against_the_double_with_managed_servers(carla_root, tmp_path):  # noqa: F811
    run, report = smoke(tmp_path, "--managed", "--carla-module", "tests.fake_carla:tcp_carla")
    assert run.returncode == 0, run.stdout + run.stderr
    statuses = {name: r["status"] for name, r in report.items()}
    assert statuses == {**{f"S{i}": "PASS" for i in range(1, 13)}, "S13": "SKIP"}
    assert "CARLA smoke test" in run.stdout and "server up on port" in run.stdout
    assert report["S8"]["metrics"]["npc_20"]["ticks_per_s"] > 0
    assert report["S7"]["metrics"]["destroy_errors"] == [] and len(report["S7"]["metrics"]["actors_per_episode"]) == 5
    assert report["S9"]["metrics"]["server_restarts"] == 1
    assert (tmp_path / "out" / "camera_first_frames.npz").is_file()


def test_against_an_external_server_the_scenarios_that_kill_servers_are_skipped(carla_root, tmp_path):  # noqa: F811
    server = ManagedServer(ServerSection(base_rpc_port=free_base_port(), log_dir=str(tmp_path)), 0, FakeCarla(tcp=True))
    server.start()
    try:
        run, report = smoke(tmp_path, "--host", "127.0.0.1", "--port", str(server.rpc_port),
                            "--carla-module", "tests.fake_carla:tcp_carla", "--only", "S1,S2,S9")
    finally:
        server.stop()
    assert run.returncode == 0, run.stdout + run.stderr
    assert {n: r["status"] for n, r in report.items()} == {"S1": "PASS", "S2": "PASS", "S9": "SKIP"}


def test_N8_the_route_scenario_passes_on_a_map_where_every_spawn_point_is_on_a_curve(carla_root, tmp_path):  # noqa: F811
    """Driving straight on, the car leaves a curve's route past 3 m within 20 steps: a false FAIL
    of S2 (the route is right). It follows the route now and is judged by its distance to it."""
    server = ManagedServer(ServerSection(base_rpc_port=free_base_port(), log_dir=str(tmp_path)), 0, FakeCarla(tcp=True))
    server.start()
    try:
        run, report = smoke(tmp_path, "--host", "127.0.0.1", "--port", str(server.rpc_port),
                            "--carla-module", "tests.fake_carla:tcp_carla_ring", "--only", "S2")
    finally:
        server.stop()
    assert run.returncode == 0 and report["S2"]["status"] == "PASS", run.stdout + run.stderr
    assert report["S2"]["metrics"]["max_distance_to_route_m"] < 1.0


def test_a_client_that_aborts_is_a_fail_with_its_signal_not_the_end_of_the_test(carla_root, tmp_path):  # noqa: F811
    run, report = smoke(tmp_path, "--managed", "--carla-module", "tests.test_carla_smoke:aborting_carla",
                        "--only", "S2,S12")
    assert run.returncode == 1
    assert report["S2"]["status"] == "FAIL" and "killed by SIGABRT" in report["S2"]["detail"]
    assert report["S12"]["status"] == "PASS"  # the next scenario still ran


@pytest.mark.parametrize("args, message", [(["--only", "S99"], "unknown scenarios ['S99']")])
def test_bad_arguments_are_clear_errors(args, message):
    run = subprocess.run([sys.executable, "-m", "carla_env.smoke", *args], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and message in run.stderr


def test_a_managed_smoke_test_refuses_root_and_a_machine_without_vulkan_before_starting_a_server(tmp_path):
    from carla_env.smoke import managed_preflight

    icd = tmp_path / "icd.d"
    icd.mkdir()
    assert managed_preflight(0, None, icd_dirs=[str(icd)]) == [
        "running as root: UE4 refuses to ('Refusing to run with the root privileges'); run as a normal user",
        "no Vulkan loader (libvulkan.so.1): install libvulkan1 (k8s/Dockerfile does)",
        f"no NVIDIA Vulkan ICD (nvidia_icd.json) in {icd}: the driver's graphics part is missing (containers: "
        "NVIDIA_DRIVER_CAPABILITIES=all; k8s/Dockerfile)",
    ]
    (icd / "nvidia_icd.json").write_text("{}")
    assert managed_preflight(1000, "libvulkan.so.1", icd_dirs=[str(icd)]) == []


def test_the_gpu_of_each_server_is_read_from_nvidia_smi_including_graphics_processes(tmp_path, monkeypatch):
    from carla_env import smoke

    xml = ("<nvidia_smi_log><gpu id='00000000:41:00.0'><processes><process_info><pid>4242</pid><type>G</type>"
           "</process_info></processes></gpu><gpu id='00000000:81:00.0'><processes><process_info><pid>77</pid>"
           "<type>C</type></process_info></processes></gpu></nvidia_smi_log>")
    nvidia_smi = tmp_path / "nvidia-smi"
    nvidia_smi.write_text(f"#!/bin/sh\necho \"{xml}\"\n")
    nvidia_smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(smoke.procfs, "group_members", lambda pgid: {4000: [4000, 4242], 7000: [7000]}[pgid])
    assert smoke._gpus_of([4000, 7000]) == {"server 4000": "00000000:41:00.0"}
